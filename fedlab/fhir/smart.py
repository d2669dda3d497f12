"""SMART Backend Services, both sides: client keys and signed assertions, and the server's token issuer.

The client proves who it is with a short-lived JWT signed by its private key (RS384 or ES384);
the server checks it against the JWKS the client registered and hands out a short-lived opaque
bearer token whose scopes decide which resource types an export may return.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from fedlab.errors import FedlabError
from fedlab.io import atomic_open, write_json

SIGNING_ALGORITHMS = ("RS384", "ES384")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_LIFETIME_S = 300
MAX_TOKEN_LIFETIME_S = 300
CLOCK_SKEW_S = 30
DEFAULT_SCOPE = "system/*.rs"
SCOPES_SUPPORTED = ("system/*.rs", "system/*.read", "system/Patient.rs", "system/Encounter.rs",
                    "system/Condition.rs", "system/Observation.rs", "system/MedicationRequest.rs")

Clock = Callable[[], float]


class SmartError(FedlabError):
    """An OAuth error: `error` is the RFC 6749 code, `status` the HTTP status to answer with."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status

    def as_json(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


def _invalid_client(description: str) -> SmartError:
    return SmartError("invalid_client", description, 401)


# ---------------------------------------------------------------- keys (client side)
@dataclass(frozen=True)
class ClientKey:
    """A client's signing key pair with its key id and algorithm."""

    kid: str
    alg: str
    private_key: Any

    @classmethod
    def generate(cls, alg: str = "ES384", kid: str | None = None) -> ClientKey:
        if alg == "RS384":
            private_key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif alg == "ES384":
            private_key = ec.generate_private_key(ec.SECP384R1())
        else:
            raise ValueError(f"unsupported signing algorithm {alg!r} (use one of {', '.join(SIGNING_ALGORITHMS)})")
        return cls(kid=kid or uuid.uuid4().hex, alg=alg, private_key=private_key)

    def public_jwk(self) -> dict[str, Any]:
        algorithm = RSAAlgorithm if self.alg == "RS384" else ECAlgorithm
        jwk = algorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig", "key_ops": ["verify"]})
        return jwk

    def jwks(self) -> dict[str, list[dict[str, Any]]]:
        return {"keys": [self.public_jwk()]}

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())

    def save(self, folder: str | Path) -> Path:
        """Write `private_key.pem` (mode 0600), `jwks.json` and `key.json` (kid, alg) into `folder`."""
        folder = Path(folder)
        with atomic_open(folder / "private_key.pem", "wb") as handle:  # mkstemp files are 0600
            handle.write(self.private_pem())
        write_json(folder / "jwks.json", self.jwks())
        write_json(folder / "key.json", {"kid": self.kid, "alg": self.alg})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> ClientKey:
        folder = Path(folder)
        meta_path = folder / "key.json"
        try:
            meta = json.loads(meta_path.read_text())
            pem = (folder / "private_key.pem").read_bytes()
            return cls(kid=meta["kid"], alg=meta["alg"], private_key=serialization.load_pem_private_key(pem, None))
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{folder}: cannot load client key ({err})") from err

    @classmethod
    def load_or_create(cls, folder: str | Path, alg: str = "ES384") -> ClientKey:
        folder = Path(folder)
        if (folder / "key.json").is_file() and (folder / "private_key.pem").is_file():
            return cls.load(folder)
        key = cls.generate(alg)
        key.save(folder)
        return key


def make_client_assertion(client_id: str, token_url: str, key: ClientKey, lifetime_s: float = 300,
                          now: float | None = None) -> str:
    """A signed `private_key_jwt` client assertion for the token endpoint at `token_url`."""
    if not 0 < lifetime_s <= MAX_ASSERTION_LIFETIME_S:
        raise ValueError(f"assertion lifetime must be in (0, {MAX_ASSERTION_LIFETIME_S}] s, got {lifetime_s}")
    issued = int(time.time() if now is None else now)
    claims = {"iss": client_id, "sub": client_id, "aud": token_url, "exp": issued + int(lifetime_s),
              "iat": issued, "jti": secrets.token_urlsafe(24)}
    headers = {"kid": key.kid, "typ": "JWT"}
    return jwt.encode(claims, key.private_key, algorithm=key.alg, headers=headers)


# ---------------------------------------------------------------- scopes
@dataclass(frozen=True)
class Scope:
    """A parsed `system/<Type|*>.<permissions>` scope; v1 `read`/`write`/`*` become v2 letters."""

    resource_type: str
    permissions: frozenset[str]
    text: str

    def covers(self, other: Scope) -> bool:
        return self.resource_type in ("*", other.resource_type) and other.permissions <= self.permissions

    def allows_read(self, resource_type: str) -> bool:
        return self.resource_type in ("*", resource_type) and "r" in self.permissions


_V1_PERMISSIONS = {"read": "rs", "write": "cud", "*": "cruds"}


def parse_scope(text: str) -> Scope:
    context, _, rest = text.partition("/")
    resource_type, _, perms = rest.rpartition(".")
    if context != "system" or not resource_type or not perms:
        raise SmartError("invalid_scope", f"unsupported scope {text!r} (expected system/<Type|*>.<perms>)")
    if "?" in perms:
        raise SmartError("invalid_scope", f"scope {text!r}: query-parameter scopes are not supported")
    if not (resource_type == "*" or (resource_type.isalpha() and resource_type[0].isupper())):
        raise SmartError("invalid_scope", f"scope {text!r}: bad resource type {resource_type!r}")
    letters = _V1_PERMISSIONS.get(perms, perms)
    if not letters or any(c not in "cruds" for c in letters) or "".join(sorted(letters, key="cruds".index)) != letters:
        raise SmartError("invalid_scope", f"scope {text!r}: bad permissions {perms!r}")
    return Scope(resource_type, frozenset(letters), text)


def parse_scopes(text: str) -> list[Scope]:
    return [parse_scope(part) for part in text.split()]


def readable_types(scopes: Iterable[Scope], candidates: Iterable[str]) -> list[str]:
    """The resource types among `candidates` that some scope allows reading."""
    scopes = list(scopes)
    return [t for t in candidates if any(s.allows_read(t) for s in scopes)]


# ---------------------------------------------------------------- server side
@dataclass(frozen=True)
class ClientRegistration:
    client_id: str
    jwks: dict[str, Any]
    scopes: tuple[Scope, ...]

    def jwk(self, kid: str) -> dict[str, Any] | None:
        return next((k for k in self.jwks.get("keys", []) if k.get("kid") == kid), None)


class ClientRegistry:
    """The backend clients a site knows: id -> registered JWKS and the scopes it may ask for."""

    def __init__(self) -> None:
        self._clients: dict[str, ClientRegistration] = {}

    def register(self, client_id: str, jwks: Mapping[str, Any], scopes: str | Iterable[str] = DEFAULT_SCOPE
                 ) -> ClientRegistration:
        scope_texts = scopes.split() if isinstance(scopes, str) else list(scopes)
        if not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
            raise ValueError(f"client {client_id!r}: JWKS must have a non-empty 'keys' list")
        registration = ClientRegistration(client_id, dict(jwks), tuple(parse_scope(s) for s in scope_texts))
        self._clients[client_id] = registration
        return registration

    def get(self, client_id: str) -> ClientRegistration | None:
        return self._clients.get(client_id)


@dataclass(frozen=True)
class AccessGrant:
    token: str
    client_id: str
    scopes: tuple[Scope, ...]
    expires_at: float

    @property
    def scope_text(self) -> str:
        return " ".join(s.text for s in self.scopes)


@dataclass
class TokenIssuer:
    """Checks client assertions (RFC 7523 / SMART Backend Services) and issues opaque bearer tokens."""

    registry: ClientRegistry
    token_lifetime_s: int = MAX_TOKEN_LIFETIME_S
    clock: Clock = time.time
    _tokens: dict[str, AccessGrant] = field(default_factory=dict)
    _seen_jti: dict[tuple[str, str], float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if not 0 < self.token_lifetime_s <= MAX_TOKEN_LIFETIME_S:
            raise ValueError(f"token lifetime must be in (0, {MAX_TOKEN_LIFETIME_S}] s")

    def issue(self, form: Mapping[str, str], token_url: str) -> dict[str, Any]:
        """Answer a token request (form fields); raises SmartError with the OAuth error code."""
        if form.get("grant_type") != "client_credentials":
            raise SmartError("unsupported_grant_type", f"grant_type {form.get('grant_type')!r} is not supported; "
                                                       "use client_credentials")
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise _invalid_client(f"client_assertion_type must be {ASSERTION_TYPE}")
        assertion = form.get("client_assertion")
        if not assertion:
            raise _invalid_client("client_assertion is missing")
        registration = self._verify_assertion(assertion, token_url)
        scopes = self._grant_scopes(registration, form.get("scope", ""))
        grant = AccessGrant(secrets.token_urlsafe(32), registration.client_id, tuple(scopes),
                            self.clock() + self.token_lifetime_s)
        with self._lock:
            self._drop_expired()
            self._tokens[grant.token] = grant
        return {"access_token": grant.token, "token_type": "bearer", "expires_in": self.token_lifetime_s,
                "scope": grant.scope_text}

    def check(self, authorization: str | None) -> AccessGrant:
        """The grant behind an `Authorization: Bearer ...` header; raises SmartError(invalid_token, 401)."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise SmartError("invalid_token", "a bearer access token is required", 401)
        with self._lock:
            grant = self._tokens.get(token.strip())
        if grant is None:
            raise SmartError("invalid_token", "unknown or revoked access token", 401)
        if grant.expires_at <= self.clock():
            raise SmartError("invalid_token", "access token expired", 401)
        return grant

    def revoke_all(self) -> None:
        with self._lock:
            self._tokens.clear()

    # -- assertion checks
    def _verify_assertion(self, assertion: str, token_url: str) -> ClientRegistration:
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError as err:
            raise _invalid_client(f"client_assertion is not a valid JWT ({err})") from None
        alg = header.get("alg")
        if alg not in SIGNING_ALGORITHMS:
            raise _invalid_client(f"assertion alg {alg!r} not accepted (use {' or '.join(SIGNING_ALGORITHMS)})")
        iss, sub = unverified.get("iss"), unverified.get("sub")
        if not iss or iss != sub:
            raise _invalid_client("assertion iss and sub must both equal the client_id")
        registration = self.registry.get(str(iss))
        if registration is None:
            raise _invalid_client(f"unknown client {iss!r}")
        claims = self._verified_claims(assertion, registration, header, alg)
        self._check_claims(claims, token_url)
        return registration

    def _verified_claims(self, assertion: str, registration: ClientRegistration, header: dict[str, Any],
                         alg: str) -> dict[str, Any]:
        jwk = registration.jwk(str(header.get("kid")))
        if jwk is None:
            raise _invalid_client(f"kid {header.get('kid')!r} is not in the registered JWKS")
        if jwk.get("alg", alg) != alg:
            raise _invalid_client(f"assertion alg {alg} does not match key {jwk['kid']} ({jwk.get('alg')})")
        try:
            public_key = jwt.PyJWK(jwk, algorithm=alg).key
            return jwt.decode(assertion, public_key, algorithms=[alg],
                              options={"verify_exp": False, "verify_iat": False, "verify_nbf": False,
                                       "verify_aud": False, "verify_iss": False})
        except jwt.PyJWTError as err:
            raise _invalid_client(f"assertion signature check failed ({err})") from None

    def _check_claims(self, claims: dict[str, Any], token_url: str) -> None:
        now = self.clock()
        aud = claims.get("aud")
        if token_url not in (aud if isinstance(aud, list) else [aud]):
            raise _invalid_client(f"assertion aud {aud!r} is not this token endpoint ({token_url})")
        exp = claims.get("exp")
        if not isinstance(exp, int | float):
            raise _invalid_client("assertion exp is missing")
        if exp <= now - CLOCK_SKEW_S:
            raise _invalid_client("assertion expired")
        if exp > now + MAX_ASSERTION_LIFETIME_S + CLOCK_SKEW_S:
            raise _invalid_client(f"assertion exp is more than {MAX_ASSERTION_LIFETIME_S} s in the future")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise _invalid_client("assertion jti is missing")
        key = (str(claims["iss"]), jti)
        with self._lock:
            self._drop_expired()
            if key in self._seen_jti:
                raise _invalid_client("assertion jti was already used (replay)")
            self._seen_jti[key] = float(exp) + CLOCK_SKEW_S

    def _grant_scopes(self, registration: ClientRegistration, requested_text: str) -> list[Scope]:
        requested = parse_scopes(requested_text)
        if not requested:
            raise SmartError("invalid_scope", "scope is required (for example system/*.rs)")
        for scope in requested:
            if not any(allowed.covers(scope) for allowed in registration.scopes):
                raise SmartError("invalid_scope", f"scope {scope.text!r} exceeds the client's registration "
                                                  f"({' '.join(s.text for s in registration.scopes)})")
        return requested

    def _drop_expired(self) -> None:
        now = self.clock()
        for token in [t for t, g in self._tokens.items() if g.expires_at <= now]:
            del self._tokens[token]
        for key in [k for k, until in self._seen_jti.items() if until <= now]:
            del self._seen_jti[key]
