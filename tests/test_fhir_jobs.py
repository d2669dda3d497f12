"""The site server's parts without HTTP: the job store's lifecycle, the app's blueprints."""

from __future__ import annotations

import threading
from pathlib import Path

from helpers import write_bulk

from fedlab.fhir.app import make_app
from fedlab.fhir.export_request import build_export_request
from fedlab.fhir.jobs import ExportJob, JobStore, manifest
from fedlab.fhir.smart import ClientRegistry


def _site(tmp_path: Path):
    bulk = write_bulk(tmp_path, {"Patient": [{"resourceType": "Patient", "id": f"p{i}"} for i in range(3)]})
    return make_app(bulk, ClientRegistry(), work_dir=tmp_path / "work", base_url="http://site").extensions[
        "fedlab_site"]


def test_a_job_runs_from_queued_to_complete_and_delete_removes_its_files(tmp_path: Path) -> None:
    site = _site(tmp_path)
    store: JobStore = site.jobs
    export = build_export_request("system", [("_type", "Patient")], [], lenient=False)
    job = store.add(ExportJob("j1", "client", "http://site/$export", export, ["Patient"], store.folder("j1")))
    assert (job.status, job.progress, store.running()) == ("running", "queued", 1)
    store.start(job, site)
    job.thread.join(timeout=10)
    assert (job.status, job.progress, store.running()) == ("complete", "100%", 0)
    assert manifest(job)["output"] == [{"type": "Patient", "url": "http://site/files/j1/Patient.1.ndjson", "count": 3}]
    assert (job.folder / "Patient.1.ndjson").read_text().count("\n") == 3
    assert store.owned("j1", "client") is job and store.owned("j1", "someone else") is None
    store.delete(job)
    assert store.owned("j1", "client") is None and not job.folder.exists() and job.cancel.is_set()


def test_shutdown_cancels_running_jobs_and_removes_the_work_folder(tmp_path: Path) -> None:
    site = _site(tmp_path)
    site.options.job_delay_s = 30.0  # the job waits; shutdown must not
    export = build_export_request("system", [], [], lenient=False)
    job = site.jobs.add(ExportJob("j2", "client", "u", export, ["Patient"], site.jobs.folder("j2")))
    site.jobs.start(job, site)
    assert isinstance(job.thread, threading.Thread) and job.thread.is_alive()
    site.owns_work_dir = True
    site.shutdown()
    assert not job.thread.is_alive() and job.cancel.is_set() and not (tmp_path / "work").exists()


def test_the_app_serves_every_blueprint(tmp_path: Path) -> None:
    bulk = write_bulk(tmp_path, {"Patient": []})
    app = make_app(bulk, ClientRegistry(), work_dir=tmp_path / "work")
    rules = {rule.rule: rule.endpoint.split(".")[0] for rule in app.url_map.iter_rules() if rule.endpoint != "static"}
    assert rules == {
        "/.well-known/smart-configuration": "discovery", "/auth/token": "discovery", "/metadata": "metadata",
        "/$export": "export", "/Patient/$export": "export", "/Group/<group_id>/$export": "export",
        "/jobs/<job_id>": "export", "/files/<job_id>/<name>": "export", "/": "writeback",
        "/SubscriptionTopic": "subscriptions", "/SubscriptionTopic/<topic_id>": "subscriptions",
        "/Subscription": "subscriptions", "/Subscription/<sub_id>": "subscriptions"}
    response = app.test_client().get("/metadata")
    assert response.status_code == 200 and response.get_json()["resourceType"] == "CapabilityStatement"
    assert app.test_client().get("/jobs/nope").status_code == 401  # a data request needs a token
