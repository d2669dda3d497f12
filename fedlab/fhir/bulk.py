"""A conformant FHIR Bulk Data client authenticating with SMART Backend Services.

Discovery, token (signed assertion; cached, refreshed on expiry or a 401), kick-off, polling that
honours Retry-After (delta-seconds, HTTP-date or epoch seconds; clamped), backoff on 429/5xx and
transient OperationOutcomes, streamed atomic downloads checked against the manifest `count`,
and DELETE of the job at the end.
"""

from __future__ import annotations

import email.utils
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from tqdm.auto import tqdm
from urllib3.util.retry import Retry

from fedlab.errors import FedlabError
from fedlab.fhir.smart import ASSERTION_TYPE, ClientKey, make_client_assertion

FHIR_JSON = "application/fhir+json"
RETRY_STATUSES = (429, 500, 502, 503, 504)
TOKEN_REFRESH_MARGIN_S = 15.0


class BulkDataError(FedlabError):
    """The export could not be completed; the message names the URL or file concerned."""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After value: delta-seconds, an HTTP-date, or absolute epoch seconds."""
    if value is None or not value.strip():
        return None
    now = time.time() if now is None else now
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        return max(0.0, moment.timestamp() - now)
    # Some servers send an absolute epoch time instead of a delay; nothing waits 30 years.
    return max(0.0, number - now) if number > 1e9 else max(0.0, number)


class _CappedRetry(Retry):
    """urllib3 Retry whose Retry-After sleeps are capped (a server may ask for hours)."""

    max_retry_after_s = 10.0

    def get_retry_after(self, response: Any) -> float | None:
        seconds = parse_retry_after(response.headers.get("Retry-After"))
        return None if seconds is None else min(seconds, self.max_retry_after_s)

    def new(self, **kw: Any) -> _CappedRetry:
        retry = super().new(**kw)
        retry.max_retry_after_s = self.max_retry_after_s
        return retry


@dataclass
class DownloadedFile:
    name: str
    type: str
    url: str
    count: int | None
    lines: int
    bytes: int
    skipped: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "url": self.url, "count": self.count, "lines": self.lines,
                "bytes": self.bytes, "skipped_existing": self.skipped}


@dataclass
class ExportResult:
    manifest: dict[str, Any]
    files: list[DownloadedFile]
    errors: list[dict[str, Any]]
    deleted: list[dict[str, Any]]
    kickoff: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def transaction_time(self) -> str:
        """Keep this as `_since` for the next incremental export."""
        return str(self.manifest["transactionTime"])

    @property
    def fhir_version(self) -> str:
        """The FHIR version of the files (`4.0.1` unless the server says otherwise in the manifest)."""
        return str(self.manifest.get("fhirVersion", "4.0.1"))


@dataclass
class _Token:
    value: str
    expires_at: float
    scope: str


class BulkDataClient:
    """Bulk Data export from one FHIR server, authenticated as a SMART backend service."""

    def __init__(self, base_url: str, client_id: str, key: ClientKey, scope: str = "system/*.rs", *,
                 max_retry_after_s: float = 10.0, min_wait_s: float = 0.5, max_attempts: int = 8,
                 timeout_s: float = 60.0, poll_timeout_s: float = 3600.0, progress: bool = True,
                 sleep: Callable[[float], None] = time.sleep, fhir_version: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.client_id, self.key, self.scope = client_id, key, scope
        self.max_retry_after_s, self.min_wait_s = max_retry_after_s, min(min_wait_s, max_retry_after_s)
        self.max_attempts, self.timeout_s, self.poll_timeout_s = max_attempts, timeout_s, poll_timeout_s
        self.progress = progress
        if fhir_version is not None and not fhir_version.startswith(("4.0", "5.0")):
            raise ValueError(f"fhir_version must be 4.0 or 5.0 (or None for the server's default), not {fhir_version!r}")
        self.fhir_version = fhir_version  # asked for with `Accept: application/fhir+json; fhirVersion=...`
        self._sleep = sleep
        self._config: dict[str, Any] | None = None
        self._token: _Token | None = None
        self.session = self._make_session(retry_statuses=True)  # idempotent GETs: discovery, downloads
        self.control = self._make_session(retry_statuses=False)  # kick-off/status: retried explicitly
        self.events: list[str] = []  # what was retried and why, for reports and tests

    def _make_session(self, retry_statuses: bool) -> requests.Session:
        retry = _CappedRetry(total=self.max_attempts, connect=3, read=2,
                             status=self.max_attempts if retry_statuses else 0,
                             status_forcelist=RETRY_STATUSES if retry_statuses else (),
                             allowed_methods=frozenset({"GET", "HEAD", "DELETE"}), backoff_factor=self.min_wait_s,
                             backoff_max=self.max_retry_after_s, respect_retry_after_header=True,
                             raise_on_status=False)
        retry.max_retry_after_s = self.max_retry_after_s
        session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    def close(self) -> None:
        self.session.close()
        self.control.close()

    def __enter__(self) -> BulkDataClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ discovery and token
    def discover(self) -> dict[str, Any]:
        if self._config is None:
            url = f"{self.base_url}/.well-known/smart-configuration"
            response = self.session.get(url, headers={"Accept": "application/json"}, timeout=self.timeout_s)
            config = _json_or_error(response, url)
            if "token_endpoint" not in config:
                raise BulkDataError(f"{url}: no token_endpoint in the SMART configuration")
            if "client-confidential-asymmetric" not in config.get("capabilities", []):
                raise BulkDataError(f"{url}: server does not advertise client-confidential-asymmetric")
            self._config = config
        return self._config

    def access_token(self, force_refresh: bool = False) -> str:
        token = self._token
        if token is not None and not force_refresh and time.monotonic() < token.expires_at - TOKEN_REFRESH_MARGIN_S:
            return token.value
        token_url = self.discover()["token_endpoint"]
        form = {"grant_type": "client_credentials", "scope": self.scope,
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": make_client_assertion(self.client_id, token_url, self.key)}
        response = self._with_backoff("token", lambda: self.control.post(
            token_url, data=form, headers={"Accept": "application/json"}, timeout=self.timeout_s))
        if response.status_code != 200:
            raise BulkDataError(f"{token_url}: token request refused (HTTP {response.status_code}): "
                                f"{_describe(response)}")
        body = response.json()
        lifetime = float(body.get("expires_in", 300))
        self._token = _Token(body["access_token"], time.monotonic() + lifetime, body.get("scope", ""))
        return self._token.value

    def _authorized(self, send: Callable[[dict[str, str]], requests.Response]) -> requests.Response:
        """Send with the bearer token; on a 401 get a fresh token and try once more."""
        response = send({"Authorization": f"Bearer {self.access_token()}"})
        if response.status_code == 401:
            self.events.append("401: refreshed the access token")
            response.close()
            response = send({"Authorization": f"Bearer {self.access_token(force_refresh=True)}"})
        return response

    # ------------------------------------------------------------ kick-off, poll, delete
    def kickoff(self, level: str = "system", *, types: Iterable[str] | None = None, since: str | None = None,
                type_filters: Iterable[str] | None = None, elements: Iterable[str] | None = None,
                output_format: str | None = None, patients: Iterable[str] | None = None,
                group_id: str = "all") -> str:
        """Start an export; returns the status URL (from Content-Location)."""
        url = self._kickoff_url(level, group_id)
        params = _kickoff_params(types, since, type_filters, elements, output_format)
        accept = FHIR_JSON if self.fhir_version is None else f"{FHIR_JSON}; fhirVersion={self.fhir_version[:3]}"
        headers = {"Accept": accept, "Prefer": "respond-async"}
        if patients is not None:
            body = _parameters_body(params, patients)

            def send(auth: dict[str, str]) -> requests.Response:
                return self.control.post(url, json=body, headers={**headers, **auth, "Content-Type": FHIR_JSON},
                                         timeout=self.timeout_s)
        else:
            def send(auth: dict[str, str]) -> requests.Response:
                return self.control.get(url, params=params, headers={**headers, **auth}, timeout=self.timeout_s)

        response = self._with_backoff("kick-off", lambda: self._authorized(send))
        if response.status_code != 202:
            raise BulkDataError(f"{url}: kick-off refused (HTTP {response.status_code}): {_describe(response)}")
        location = response.headers.get("Content-Location")
        if not location:
            raise BulkDataError(f"{url}: kick-off answered 202 without a Content-Location header")
        return location

    def _kickoff_url(self, level: str, group_id: str) -> str:
        paths = {"system": "/$export", "patient": "/Patient/$export", "group": f"/Group/{group_id}/$export"}
        if level not in paths:
            raise ValueError(f"export level must be system, patient or group, not {level!r}")
        return self.base_url + paths[level]

    def wait(self, status_url: str) -> dict[str, Any]:
        """Poll the status URL until the manifest is ready; returns the manifest."""
        deadline = time.monotonic() + self.poll_timeout_s
        delay = self.min_wait_s
        while True:
            response = self._with_backoff("status", lambda: self._authorized(
                lambda auth: self.control.get(status_url, headers={"Accept": "application/json", **auth},
                                              timeout=self.timeout_s)))
            if response.status_code == 200:
                return self._checked_version(_json_or_error(response, status_url), status_url)
            if response.status_code != 202:
                raise BulkDataError(f"{status_url}: export failed (HTTP {response.status_code}): "
                                    f"{_describe(response)}")
            if time.monotonic() > deadline:
                raise BulkDataError(f"{status_url}: export not finished after {self.poll_timeout_s:g} s "
                                    f"(last progress {response.headers.get('X-Progress')!r})")
            self.events.append(f"202 in progress: {response.headers.get('X-Progress', '')}")
            hinted = parse_retry_after(response.headers.get("Retry-After"))
            self._sleep(self._clamp(hinted if hinted is not None else delay))
            delay = min(delay * 2, self.max_retry_after_s)

    def _checked_version(self, manifest: dict[str, Any], status_url: str) -> dict[str, Any]:
        if self.fhir_version is not None and self.fhir_version.startswith("5."):
            served = str(manifest.get("fhirVersion", "4.0.1"))
            if not served.startswith("5."):
                raise BulkDataError(f"{status_url}: asked for FHIR {self.fhir_version} but the manifest says "
                                    f"the files are FHIR {served}")
        return manifest

    def delete(self, status_url: str) -> int:
        response = self._authorized(lambda auth: self.session.delete(status_url, headers=auth,
                                                                     timeout=self.timeout_s))
        if response.status_code not in (200, 202, 204, 404):
            raise BulkDataError(f"{status_url}: DELETE failed (HTTP {response.status_code}): {_describe(response)}")
        return response.status_code

    def _clamp(self, seconds: float) -> float:
        return max(self.min_wait_s, min(seconds, self.max_retry_after_s))

    def _with_backoff(self, what: str, send: Callable[[], requests.Response]) -> requests.Response:
        """Retry 429/5xx and transient OperationOutcomes, honouring Retry-After (clamped)."""
        delay = self.min_wait_s
        for attempt in range(1, self.max_attempts + 1):
            response = send()
            if not _should_retry(response) or attempt == self.max_attempts:
                return response
            hinted = parse_retry_after(response.headers.get("Retry-After"))
            wait = self._clamp(hinted if hinted is not None else delay)
            self.events.append(f"{what}: HTTP {response.status_code}, retry in {wait:.2f} s")
            response.close()
            self._sleep(wait)
            delay = min(delay * 2, self.max_retry_after_s)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ downloads
    def download(self, manifest: dict[str, Any], dest_dir: str | Path,
                 on_first_byte: Callable[[], None] | None = None) -> list[DownloadedFile]:
        """Download every `output` entry into `dest_dir` (atomic, resumable, line counts checked)."""
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        entries = list(manifest.get("output", []))
        names = _local_names(entries)
        total = sum(int(e.get("count") or 0) for e in entries)
        with tqdm(total=total, unit="res", desc="download", disable=not self.progress, leave=False) as bar:
            return [self._download_one(entry, dest / name, manifest, bar, on_first_byte)
                    for entry, name in zip(entries, names, strict=True)]

    def _download_one(self, entry: dict[str, Any], final: Path, manifest: dict[str, Any], bar: Any,
                      on_first_byte: Callable[[], None] | None) -> DownloadedFile:
        url, count = entry["url"], entry.get("count")
        if final.is_file() and count is not None and _count_lines(final) == int(count):
            bar.update(int(count))
            return DownloadedFile(final.name, entry["type"], url, int(count), int(count), final.stat().st_size, True)
        tmp = final.with_name(f".{final.name}.part")
        problem = ""
        try:
            for attempt in range(1, self.max_attempts + 1):
                try:
                    lines, size = self._stream_to(url, tmp, manifest, bar, on_first_byte)
                except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError) as err:
                    problem = f"connection broken mid-download ({type(err).__name__})"
                else:
                    if count is None or lines == int(count):
                        os.replace(tmp, final)
                        return DownloadedFile(final.name, entry["type"], url, None if count is None else int(count),
                                              lines, size)
                    problem = f"downloaded {lines} lines for {final.name} but the manifest says count={count}"
                self.events.append(f"download retry {attempt}: {url}: {problem}")
                self._sleep(self.min_wait_s * attempt)
        finally:
            tmp.unlink(missing_ok=True)
        raise BulkDataError(f"{url}: {problem}; gave up after {self.max_attempts} attempts, file discarded")

    def _stream_to(self, url: str, tmp: Path, manifest: dict[str, Any], bar: Any,
                   on_first_byte: Callable[[], None] | None) -> tuple[int, int]:
        def send(auth: dict[str, str]) -> requests.Response:
            headers = {"Accept": "application/fhir+ndjson"}
            if manifest.get("requiresAccessToken", True):
                headers.update(auth)
            return self.session.get(url, headers=headers, stream=True, timeout=self.timeout_s)

        lines = size = 0
        last_byte = b"\n"
        with self._authorized(send) as response:
            if response.status_code != 200:
                raise BulkDataError(f"{url}: download failed (HTTP {response.status_code}): {_describe(response)}")
            with open(tmp, "wb") as handle:
                for chunk in response.iter_content(chunk_size=1 << 18):
                    if not chunk:
                        continue
                    if size == 0 and on_first_byte is not None:
                        on_first_byte()
                    handle.write(chunk)
                    new_lines = chunk.count(b"\n")
                    lines += new_lines
                    size += len(chunk)
                    last_byte = chunk[-1:]
                    bar.update(new_lines)
        return lines + (last_byte != b"\n"), size

    def fetch_ndjson(self, url: str, requires_token: bool = True) -> list[dict[str, Any]]:
        """Read a small NDJSON file (error or deleted entries) into memory."""
        def send(auth: dict[str, str]) -> requests.Response:
            return self.session.get(url, headers=auth if requires_token else {}, timeout=self.timeout_s)

        response = self._authorized(send)
        if response.status_code != 200:
            raise BulkDataError(f"{url}: download failed (HTTP {response.status_code}): {_describe(response)}")
        rows = []
        for number, line in enumerate(response.text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise BulkDataError(f"{url}:{number}: not valid JSON ({err.msg})") from None
        return rows

    # ------------------------------------------------------------ the whole flow
    def export(self, dest_dir: str | Path, level: str = "system", *, delete: bool = True,
               **kickoff_args: Any) -> ExportResult:
        """Kick off, wait, download outputs, read error[]/deleted[], then DELETE the job."""
        started = time.perf_counter()
        first_byte: list[float] = []
        status_url = self.kickoff(level, **kickoff_args)
        kicked = time.perf_counter()
        try:
            manifest = self.wait(status_url)
            ready = time.perf_counter()
            files = self.download(manifest, dest_dir,
                                  lambda: first_byte or first_byte.append(time.perf_counter() - started))
            requires = bool(manifest.get("requiresAccessToken", True))
            errors = [row for e in manifest.get("error", []) for row in self.fetch_ndjson(e["url"], requires)]
            deleted = [row for e in manifest.get("deleted", []) for row in self.fetch_ndjson(e["url"], requires)]
        finally:
            if delete:
                self.delete(status_url)
        done = time.perf_counter()
        timings = {"kickoff_s": kicked - started, "wait_s": ready - kicked, "download_s": done - ready,
                   "total_s": done - started, "time_to_first_byte_s": first_byte[0] if first_byte else done - started}
        kickoff = {"level": level, "status_url": status_url,
                   **{k: (list(v) if isinstance(v, Iterable) and not isinstance(v, str) else v)
                      for k, v in kickoff_args.items() if v is not None}}
        return ExportResult(manifest, files, errors, deleted, kickoff, timings)


# ---------------------------------------------------------------- helpers
def _kickoff_params(types: Iterable[str] | None, since: str | None, type_filters: Iterable[str] | None,
                    elements: Iterable[str] | None, output_format: str | None) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = []
    if types is not None:
        params.append(("_type", ",".join(types)))
    if since is not None:
        params.append(("_since", since))
    for type_filter in type_filters or ():
        params.append(("_typeFilter", type_filter))
    if elements is not None:
        params.append(("_elements", ",".join(elements)))
    if output_format is not None:
        params.append(("_outputFormat", output_format))
    return params


def _parameters_body(params: list[tuple[str, str]], patients: Iterable[str]) -> dict[str, Any]:
    parameter: list[dict[str, Any]] = [{"name": name, "valueString": value} for name, value in params]
    for patient in patients:
        reference = patient if "/" in patient else f"Patient/{patient}"
        parameter.append({"name": "patient", "valueReference": {"reference": reference}})
    return {"resourceType": "Parameters", "parameter": parameter}


def _local_names(entries: list[dict[str, Any]]) -> list[str]:
    """`<Type>.ndjson`, or `<Type>.<k>.ndjson` when a type has several outputs; from the manifest `type`."""
    per_type: dict[str, int] = {}
    for entry in entries:
        per_type[entry["type"]] = per_type.get(entry["type"], 0) + 1
    seen: dict[str, int] = {}
    names = []
    for entry in entries:
        kind = entry["type"]
        seen[kind] = seen.get(kind, 0) + 1
        names.append(f"{kind}.ndjson" if per_type[kind] == 1 else f"{kind}.{seen[kind]}.ndjson")
    return names


def _count_lines(path: Path) -> int:
    lines, last = 0, b"\n"
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def _is_transient(response: requests.Response) -> bool:
    if "json" not in response.headers.get("Content-Type", ""):
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return (isinstance(body, dict) and body.get("resourceType") == "OperationOutcome"
            and any(issue.get("code") == "transient" for issue in body.get("issue", [])))


def _should_retry(response: requests.Response) -> bool:
    return response.status_code in RETRY_STATUSES or (response.status_code >= 400 and _is_transient(response))


def _describe(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return "; ".join(str(i.get("diagnostics") or i.get("code")) for i in body.get("issue", []))
    if isinstance(body, dict) and "error" in body:
        return f"{body['error']}: {body.get('error_description', '')}"
    return json.dumps(body)[:300]


def _json_or_error(response: requests.Response, url: str) -> dict[str, Any]:
    if response.status_code != 200:
        raise BulkDataError(f"{url}: HTTP {response.status_code}: {_describe(response)}")
    try:
        body = response.json()
    except ValueError:
        raise BulkDataError(f"{url}: response is not JSON") from None
    if not isinstance(body, dict):
        raise BulkDataError(f"{url}: expected a JSON object")
    return body
