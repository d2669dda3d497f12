"""The site server's routes, one Flask blueprint per feature:

- `discovery`: `/.well-known/smart-configuration`, `POST /auth/token`;
- `metadata`: `GET /metadata` (CapabilityStatement, R4 or R5);
- `export`: `/$export`, `/Patient/$export`, `/Group/<id>/$export`, `/jobs/<id>` (status, DELETE), `/files/<job>/<name>`;
- `writeback`: `POST /` (a transaction of RiskAssessments);
- `subscriptions`: `/SubscriptionTopic`, `/Subscription`.

Each reads its site's state with `access.site_state()`; `fedlab.fhir.app.make_app` registers them all.
"""

from __future__ import annotations

from fedlab.fhir.routes.discovery import discovery
from fedlab.fhir.routes.export import export
from fedlab.fhir.routes.metadata import metadata
from fedlab.fhir.routes.subscriptions import subscriptions
from fedlab.fhir.routes.writeback import writeback

BLUEPRINTS = (discovery, metadata, export, writeback, subscriptions)
