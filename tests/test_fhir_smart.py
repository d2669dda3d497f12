"""SMART Backend Services: keys, assertions, and a battery of forged assertions and token misuse over HTTP."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from helpers import write_bulk

from fedlab.fhir.smart import (
    ASSERTION_TYPE,
    ClientKey,
    ClientRegistry,
    SmartError,
    TokenIssuer,
    make_client_assertion,
    parse_scope,
)

CLIENT = "node-a"


def _two_patients(folder: Path) -> Path:
    patients = [{"resourceType": "Patient", "id": f"p{i}", "gender": "female"} for i in (1, 2)]
    observations = [{"resourceType": "Observation", "id": f"o{i}", "status": "final",
                     "subject": {"reference": f"Patient/p{i}"},
                     "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]}} for i in (1, 2)]
    return write_bulk(folder, {"Patient": patients, "Observation": observations}, compact=False)


class _Clock:
    """Real time plus an adjustable offset, so a test can make issued tokens expire."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture(scope="module")
def keys() -> dict[str, ClientKey]:
    return {"ES384": ClientKey.generate("ES384"), "RS384": ClientKey.generate("RS384")}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, ClientKey]):
    from fedlab.fhir.server import SiteServer

    registry = ClientRegistry()
    registry.register(CLIENT, keys["ES384"].jwks(), "system/*.rs")
    registry.register("node-rsa", keys["RS384"].jwks(), "system/*.read")
    registry.register("node-obs", keys["ES384"].jwks(), "system/Observation.rs")
    clock = _Clock()
    issuer = TokenIssuer(registry, clock=clock)
    with SiteServer(_two_patients(tmp_path_factory.mktemp("smart")), registry, issuer=issuer) as server:
        server.clock = clock  # type: ignore[attr-defined]
        yield server


def _token_url(site: Any) -> str:
    return f"{site.base_url}/auth/token"


def _request_token(site: Any, assertion: str, scope: str = "system/*.rs", **extra: str) -> requests.Response:
    form = {"grant_type": "client_credentials", "scope": scope, "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion, **extra}
    return requests.post(_token_url(site), data=form, timeout=10)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"


def _claims(site: Any, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": CLIENT, "sub": CLIENT, "aud": _token_url(site), "exp": now + 240, "iat": now,
              "jti": secrets.token_hex(12)}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(key: ClientKey, claims: dict[str, Any], kid: str | None = None) -> str:
    return jwt.encode(claims, key.private_key, algorithm=key.alg, headers={"kid": kid or key.kid, "typ": "JWT"})


# ---------------------------------------------------------------- keys and assertions
@pytest.mark.parametrize("alg,kty", [("RS384", "RSA"), ("ES384", "EC")])
def test_key_generation_and_jwks(keys: dict[str, ClientKey], alg: str, kty: str) -> None:
    jwk = keys[alg].jwks()["keys"][0]
    assert jwk["kty"] == kty and jwk["alg"] == alg and jwk["kid"] == keys[alg].kid
    assert "d" not in jwk and "p" not in jwk  # public parts only


def test_key_save_and_load_roundtrip(tmp_path: Path, keys: dict[str, ClientKey]) -> None:
    keys["ES384"].save(tmp_path / "k")
    loaded = ClientKey.load(tmp_path / "k")
    assert loaded.kid == keys["ES384"].kid and loaded.jwks() == keys["ES384"].jwks()
    assert (tmp_path / "k" / "private_key.pem").stat().st_mode & 0o077 == 0
    assert ClientKey.load_or_create(tmp_path / "k").kid == loaded.kid


def test_client_assertion_claims(keys: dict[str, ClientKey]) -> None:
    key = keys["RS384"]
    first = make_client_assertion("c1", "https://site/token", key)
    second = make_client_assertion("c1", "https://site/token", key)
    header = jwt.get_unverified_header(first)
    assert header == {"alg": "RS384", "kid": key.kid, "typ": "JWT"}
    claims = jwt.decode(first, key.private_key.public_key(), algorithms=["RS384"], audience="https://site/token")
    assert claims["iss"] == claims["sub"] == "c1"
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert claims["jti"] != jwt.decode(second, options={"verify_signature": False})["jti"]
    with pytest.raises(ValueError, match="lifetime"):
        make_client_assertion("c1", "https://site/token", key, lifetime_s=301)


@pytest.mark.parametrize("text,letters", [("system/*.rs", "rs"), ("system/Observation.rs", "rs"),
                                          ("system/*.read", "rs"), ("system/Patient.cruds", "cruds")])
def test_scope_forms(text: str, letters: str) -> None:
    assert parse_scope(text).permissions == frozenset(letters)


@pytest.mark.parametrize("text", ["patient/*.rs", "system/*.sr", "system/*.x", "system/observation.rs",
                                  "system/Observation.rs?category=laboratory"])
def test_bad_scopes_rejected(text: str) -> None:
    with pytest.raises(SmartError) as err:
        parse_scope(text)
    assert err.value.error == "invalid_scope"


# ---------------------------------------------------------------- token endpoint
@pytest.mark.parametrize("client,alg,scope", [(CLIENT, "ES384", "system/*.rs"), ("node-rsa", "RS384", "system/*.read"),
                                              (CLIENT, "ES384", "system/Observation.rs system/Patient.rs")])
def test_valid_assertion_gets_token(site: Any, keys: dict[str, ClientKey], client: str, alg: str, scope: str) -> None:
    response = _request_token(site, make_client_assertion(client, _token_url(site), keys[alg]), scope)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "bearer" and 0 < body["expires_in"] <= 300 and body["scope"] == scope
    assert len(body["access_token"]) >= 32


def _forged_assertions(site: Any, keys: dict[str, ClientKey]) -> dict[str, str]:
    es, rs = keys["ES384"], keys["RS384"]
    public_pem = es.private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    hs_body = _unsigned({"alg": "HS256", "kid": es.kid, "typ": "JWT"}, _claims(site))
    hs_sig = _b64(hmac.new(public_pem, hs_body.encode(), hashlib.sha256).digest())
    good = _sign(es, _claims(site))
    head, payload, signature = good.split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    return {
        "alg none": _unsigned({"alg": "none", "kid": es.kid, "typ": "JWT"}, _claims(site)) + ".",
        "HS256 with public key": f"{hs_body}.{hs_sig}",
        "wrong kid": _sign(es, _claims(site), kid="not-registered"),
        "key of another client": _sign(rs, _claims(site), kid=rs.kid),
        "wrong aud": _sign(es, _claims(site, aud="https://elsewhere.example/token")),
        "expired": _sign(es, _claims(site, exp=int(time.time()) - 120, iat=int(time.time()) - 400)),
        "exp too far ahead": _sign(es, _claims(site, exp=int(time.time()) + 3600)),
        "iss != sub": _sign(es, _claims(site, sub="someone-else")),
        "missing jti": _sign(es, _claims(site, jti=None)),
        "tampered signature": f"{head}.{payload}.{flipped}",
        "tampered payload": f"{head}.{_b64(json.dumps(_claims(site, iss='node-obs', sub='node-obs')).encode())}"
                            f".{signature}",
        "unknown client": _sign(es, _claims(site, iss="intruder", sub="intruder")),
        "not a JWT": "definitely-not-a-jwt",
    }


FORGERIES = ["alg none", "HS256 with public key", "wrong kid", "key of another client", "wrong aud", "expired",
             "exp too far ahead", "iss != sub", "missing jti", "tampered signature", "tampered payload",
             "unknown client", "not a JWT"]


@pytest.mark.parametrize("forgery", FORGERIES)
def test_forged_assertion_rejected(site: Any, keys: dict[str, ClientKey], forgery: str) -> None:
    response = _request_token(site, _forged_assertions(site, keys)[forgery])
    assert response.status_code == 401, (forgery, response.text)
    assert response.json()["error"] == "invalid_client"
    assert "access_token" not in response.json()


def test_replayed_jti_rejected(site: Any, keys: dict[str, ClientKey]) -> None:
    assertion = make_client_assertion(CLIENT, _token_url(site), keys["ES384"])
    assert _request_token(site, assertion).status_code == 200
    replay = _request_token(site, assertion)
    assert replay.status_code == 401 and replay.json()["error"] == "invalid_client"
    assert "replay" in replay.json()["error_description"]


def test_unsupported_grant_type(site: Any, keys: dict[str, ClientKey]) -> None:
    assertion = make_client_assertion(CLIENT, _token_url(site), keys["ES384"])
    response = _request_token(site, assertion, grant_type="authorization_code")
    assert response.status_code == 400 and response.json()["error"] == "unsupported_grant_type"


@pytest.mark.parametrize("scope", ["system/Patient.rs", "system/*.cruds", "system/*.rs"])
def test_scope_beyond_registration(site: Any, keys: dict[str, ClientKey], scope: str) -> None:
    assertion = make_client_assertion("node-obs", _token_url(site), keys["ES384"])
    response = _request_token(site, assertion, scope)
    assert response.status_code == 400 and response.json()["error"] == "invalid_scope"
    assert "access_token" not in response.json()


def test_wrong_assertion_type(site: Any, keys: dict[str, ClientKey]) -> None:
    assertion = make_client_assertion(CLIENT, _token_url(site), keys["ES384"])
    response = _request_token(site, assertion, client_assertion_type="urn:example:password")
    assert response.status_code == 401 and response.json()["error"] == "invalid_client"


# ---------------------------------------------------------------- token use on data endpoints
def _token(site: Any, keys: dict[str, ClientKey], client: str = CLIENT, scope: str = "system/*.rs") -> str:
    response = _request_token(site, make_client_assertion(client, _token_url(site), keys["ES384"]), scope)
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def _kickoff(site: Any, token: str | None, params: dict[str, str] | None = None) -> requests.Response:
    headers = {"Accept": "application/fhir+json", "Prefer": "respond-async"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.get(f"{site.base_url}/$export", params=params, headers=headers, timeout=10)


def _finished_job(site: Any, token: str) -> dict[str, Any]:
    status_url = _kickoff(site, token).headers["Content-Location"]
    for _ in range(200):
        status = requests.get(status_url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        if status.status_code == 200:
            return status.json() | {"status_url": status_url}
        time.sleep(0.02)
    raise AssertionError("export did not finish")


def _assert_unauthorized(response: requests.Response) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "login"
    assert "Patient" not in response.text.replace("OperationOutcome", "")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("token", [None, "not-a-real-token", ""])
def test_kickoff_without_valid_token(site: Any, token: str | None) -> None:
    _assert_unauthorized(_kickoff(site, token))


def test_download_and_status_need_valid_token(site: Any, keys: dict[str, ClientKey]) -> None:
    manifest = _finished_job(site, _token(site, keys))
    url = manifest["output"][0]["url"]
    _assert_unauthorized(requests.get(url, timeout=10))
    _assert_unauthorized(requests.get(url, headers={"Authorization": "Bearer forged"}, timeout=10))
    _assert_unauthorized(requests.get(manifest["status_url"], timeout=10))
    other_client = _token(site, keys, "node-obs", "system/Observation.rs")
    stolen = requests.get(url, headers={"Authorization": f"Bearer {other_client}"}, timeout=10)
    assert stolen.status_code == 404 and "resourceType\": \"Patient" not in stolen.text


def test_expired_token_rejected_on_kickoff_and_download(site: Any, keys: dict[str, ClientKey]) -> None:
    token = _token(site, keys)
    manifest = _finished_job(site, token)
    site.clock.offset = 301.0
    try:
        _assert_unauthorized(_kickoff(site, token))
        _assert_unauthorized(requests.get(manifest["output"][0]["url"],
                                          headers={"Authorization": f"Bearer {token}"}, timeout=10))
    finally:
        site.clock.offset = 0.0


def test_scopes_limit_exported_types(site: Any, keys: dict[str, ClientKey]) -> None:
    token = _token(site, keys, "node-obs", "system/Observation.rs")
    manifest = _finished_job(site, token)
    assert [o["type"] for o in manifest["output"]] == ["Observation"]
    denied = _kickoff(site, token, {"_type": "Patient"})
    assert denied.status_code == 403 and denied.json()["resourceType"] == "OperationOutcome"


def test_discovery_document(site: Any) -> None:
    config = requests.get(f"{site.base_url}/.well-known/smart-configuration", timeout=10).json()
    assert config["token_endpoint"] == _token_url(site)
    assert config["grant_types_supported"] == ["client_credentials"]
    assert config["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert set(config["token_endpoint_auth_signing_alg_values_supported"]) == {"RS384", "ES384"}
    assert {"client-confidential-asymmetric", "permission-v2"} <= set(config["capabilities"])
    assert "system/*.rs" in config["scopes_supported"]
