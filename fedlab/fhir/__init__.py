"""FHIR Bulk Data `$export` behind SMART Backend Services: the site server and the node's client.

The hospital side (the site server):
- `fedlab.fhir.site`: a site's paths and policies (bulk folder, node credentials, de-identification
  policy, audit log path), used by the server and the export stage alike;
- `fedlab.fhir.app`: `make_app`, the Flask app factory; `fedlab.fhir.routes`: its blueprints
  (discovery + token, metadata, `$export` kick-off/status/files, write-back, Subscriptions);
- `fedlab.fhir.state` (what a running site holds), `fedlab.fhir.export_request` (the kick-off's
  request model), `fedlab.fhir.jobs` (the job store and the job thread), `fedlab.fhir.audit`;
- `fedlab.fhir.server`: `SiteServer` (waitress on loopback) and `serve_site` (the `fedlab serve` verb).

The node side: `fedlab.fhir.smart` (keys, signed assertions; also the server's token issuer),
`fedlab.fhir.bulk` (`BulkDataClient`: discovery, token, kick-off, poll, download, delete) and
`fedlab.fhir.export` (`export(exp, run, sites, force, progress)`, the export stage driver).
"""
