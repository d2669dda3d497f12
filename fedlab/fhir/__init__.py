"""FHIR Bulk Data `$export` behind SMART Backend Services: the site server and the node's client.

- `fedlab.fhir.smart`: client keys, signed client assertions, the server's token issuer.
- `fedlab.fhir.server`: `make_app`, `SiteServer`, `serve_site` (the `fedlab serve` verb).
- `fedlab.fhir.bulk`: `BulkDataClient` (discovery, token, kick-off, poll, download, delete).
- `fedlab.fhir.export`: `export(exp, run, sites, force, progress)`, the export stage driver.
"""
