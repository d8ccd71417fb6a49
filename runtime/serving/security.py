"""TLS, mutual TLS and per-caller authorization of the gRPC server (`[security]` knobs;
README: Security).

* **TLS** (`server_credentials`): `tls_cert` + `tls_key` serve TLS only; with `tls_client_ca`
  every client must present a certificate signed by that CA (mutual TLS: the handshake fails
  otherwise, before any RPC).
* **Callers** (`load_callers`): a TOML file (`auth_file`) of callers, each with a name, roles
  and how it proves who it is: `token_sha256` (hex SHA-256 of its bearer token: the file never
  holds a token) and/or `mtls_identity` (its client certificate's subject alternative name, or
  the subject CN when the certificate has no SAN). The file must not be writable by group or
  others. `python -m uwrt.runtime.serving.security token --name NAME --roles decide` makes a
  token and prints the entry to add.
* **The interceptor** (`AuthInterceptor`, when `auth` is not "none"): every RPC except health
  is authenticated (token from `authorization: Bearer ...` metadata, and/or the verified peer
  certificate) and checked against the role its method needs (`role_for`): Decide and
  DecideStream need "decide"; GetModelInfo any authenticated caller (the full answer needs
  "introspect", decided by the handler); reflection "introspect"; any other method "admin"
  (fail closed: an admin service added later is covered without a change here; use
  `register_method_role` to open a method to another role). No credentials: UNAUTHENTICATED;
  a wrong role: PERMISSION_DENIED; both logged rate-limited, never echoing the token.
* **In handlers**: `current_caller()` (None when auth is off), `has_role(role)`,
  `may_set_priority()` (priority > 0 is honoured only for callers with "priority"; others are
  served at priority 0), `may_introspect()`; `require_role(context, role)` aborts with
  PERMISSION_DENIED for a handler that needs a finer check than its method's role.

The caller travels in a context variable: gRPC's aio server runs the interceptor and the handler
in the same task, and tasks the handler starts inherit it. Cost per RPC with auth on: one wrapped
handler call, the metadata read, a dict lookup of the token (successful tokens are cached, so
SHA-256 runs once per token) or the peer identity read.

Thread safety: the interceptor and the context variable are used on the server's event loop;
`load_callers` and the credential helpers are pure.
"""
from __future__ import annotations

import argparse
import contextvars
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import sys
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from uwrt.runtime.config import SecurityConfig
from uwrt.runtime.errors import echo

__all__ = ["ROLES", "AuthInterceptor", "Caller", "Callers", "SecurityError", "channel", "current_caller",
           "has_role", "load_callers", "may_introspect", "may_set_priority", "register_method_role",
           "require_role", "role_for", "server_credentials", "token_sha256"]

log = logging.getLogger("uwrt.security")

#: Roles a caller may hold. "decide": Decide / DecideStream; "priority": its priority > 0 is
#: honoured; "introspect": full GetModelInfo and reflection; "admin": every other method.
ROLES = ("decide", "priority", "introspect", "admin")
#: A method that needs no authentication at all.
OPEN: None = None
#: A method any authenticated caller may call.
ANY_CALLER = ""

_EXACT: dict[str, str | None] = {
    "/uwrt.v1.Underwriting/Decide": "decide",
    "/uwrt.v1.Underwriting/DecideStream": "decide",
    "/uwrt.v1.Underwriting/GetModelInfo": ANY_CALLER,
}
_PREFIX: dict[str, str | None] = {
    "/grpc.health.v1.Health/": OPEN,
    "/grpc.reflection.v1alpha.ServerReflection/": "introspect",
    "/grpc.reflection.v1.ServerReflection/": "introspect",
}
DEFAULT_ROLE = "admin"


class SecurityError(Exception):
    """TLS or auth configuration that cannot be used (unreadable file, bad callers file)."""


def register_method_role(method: str, role: str | None) -> None:
    """The role `method` needs ("/pkg.Service/Method"; a prefix ending in "/" covers a whole
    service): one of ROLES, ANY_CALLER ("") or OPEN (None: no authentication). Unlisted methods
    need "admin". Call at import time, before servers start."""
    if role not in ROLES and role not in (OPEN, ANY_CALLER):
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    (_PREFIX if method.endswith("/") else _EXACT)[method] = role


def role_for(method: str) -> str | None:
    """The role `method` needs (see register_method_role)."""
    if method in _EXACT:
        return _EXACT[method]
    for prefix, role in _PREFIX.items():
        if method.startswith(prefix):
            return role
    return DEFAULT_ROLE


# ------------------------------------------------------------------------------------- callers

@dataclass(frozen=True)
class Caller:
    """An authenticated caller: its name (for logs) and roles; `via` is "token" or "mtls"."""
    name: str
    roles: frozenset[str]
    via: str = "token"


@dataclass(frozen=True)
class Callers:
    by_token_sha256: Mapping[str, Caller]
    by_identity: Mapping[str, Caller]


def token_sha256(token: str) -> str:
    """The hex SHA-256 of a bearer token, as the callers file holds it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_file(path: str, what: str, *, private: bool = False) -> bytes:
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise SecurityError(f"{what} {path}: cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise SecurityError(f"{what} {path}: not a regular file")
    if st.st_mode & 0o022:
        raise SecurityError(f"{what} {path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                            "chmod go-w it")
    if private and st.st_mode & 0o044:
        log.warning("%s %s is readable by group or others (mode %o): keep private keys 0600", what, path,
                    stat.S_IMODE(st.st_mode))
    return data


def load_callers(path: str) -> Callers:
    """Parse and check the callers file (see the module docstring). Raises SecurityError."""
    text = _check_file(path, "auth_file")
    try:
        doc = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise SecurityError(f"auth_file {path}: not valid TOML ({e})") from None
    entries = doc.get("caller", [])
    unknown = set(doc) - {"caller"}
    if unknown or not isinstance(entries, list) or not entries:
        raise SecurityError(f"auth_file {path}: expected one or more [[caller]] tables"
                            + (f", got keys {sorted(unknown)}" if unknown else ""))
    tokens: dict[str, Caller] = {}
    idents: dict[str, Caller] = {}
    names: set[str] = set()
    for i, ent in enumerate(entries):
        where = f"auth_file {path}: caller {i + 1}"
        if not isinstance(ent, dict):
            raise SecurityError(f"{where}: must be a table")
        extra = set(ent) - {"name", "roles", "token_sha256", "mtls_identity"}
        if extra:
            raise SecurityError(f"{where}: unknown keys {sorted(extra)} (a plaintext token is never accepted; "
                                "give its token_sha256)")
        name, roles = ent.get("name"), ent.get("roles")
        if not isinstance(name, str) or not name or name in names:
            raise SecurityError(f"{where}: needs a unique non-empty name")
        if not isinstance(roles, list) or not all(r in ROLES for r in roles):
            raise SecurityError(f"{where} ({name}): roles must be a list of {', '.join(ROLES)}")
        names.add(name)
        tok, ident = ent.get("token_sha256"), ent.get("mtls_identity")
        if tok is None and ident is None:
            raise SecurityError(f"{where} ({name}): needs token_sha256 and/or mtls_identity")
        if tok is not None:
            if not isinstance(tok, str) or not re.fullmatch(r"[0-9a-f]{64}", tok):
                raise SecurityError(f"{where} ({name}): token_sha256 must be 64 lowercase hex digits")
            if tok in tokens:
                raise SecurityError(f"{where} ({name}): token_sha256 already belongs to {tokens[tok].name}")
            tokens[tok] = Caller(name, frozenset(roles), "token")
        if ident is not None:
            if not isinstance(ident, str) or not ident:
                raise SecurityError(f"{where} ({name}): mtls_identity must be a non-empty string")
            if ident in idents:
                raise SecurityError(f"{where} ({name}): mtls_identity already belongs to {idents[ident].name}")
            idents[ident] = Caller(name, frozenset(roles), "mtls")
    return Callers(tokens, idents)


# ------------------------------------------------------------------------------------------ TLS

def server_credentials(sec: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS server credentials for `sec` (None: plaintext). Raises SecurityError."""
    if not sec.tls:
        return None
    cert = _check_file(sec.tls_cert, "tls_cert")
    key = _check_file(sec.tls_key, "tls_key", private=True)
    ca = _check_file(sec.tls_client_ca, "tls_client_ca") if sec.tls_client_ca else None
    for data, what in ((cert, "tls_cert"), (key, "tls_key"), (ca, "tls_client_ca")):
        if data is not None and b"-----BEGIN" not in data:
            raise SecurityError(f"{what}: not a PEM file")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def check(sec: SecurityConfig) -> None:
    """Read every TLS and auth file `sec` names, as the server will (raises SecurityError): for
    `uwrt serve` to fail at once, before a bundle is loaded or a worker started."""
    server_credentials(sec)
    if sec.auth != "none":
        load_callers(sec.auth_file)


def channel(target: str, *, tls_ca: str = "", tls_cert: str = "", tls_key: str = "",
            options: Iterable[tuple[str, Any]] = (), aio: bool = False) -> Any:
    """A client channel to `target`: TLS when any of tls_ca / tls_cert / tls_key is given
    (tls_ca: the CA to trust, default the system's; tls_cert + tls_key: a client certificate for
    mutual TLS), plaintext otherwise. Raises SecurityError for unreadable files."""
    opts = list(options)
    mod: Any = grpc.aio if aio else grpc
    if not (tls_ca or tls_cert or tls_key):
        return mod.insecure_channel(target, options=opts)
    if bool(tls_cert) != bool(tls_key):
        raise SecurityError("a client certificate needs both --tls-cert and --tls-key")

    def read(p: str) -> bytes | None:
        if not p:
            return None
        try:
            with open(p, "rb") as fh:
                return fh.read()
        except OSError as e:
            raise SecurityError(f"{p}: cannot be read ({e.strerror or e})") from None
    creds = grpc.ssl_channel_credentials(root_certificates=read(tls_ca), private_key=read(tls_key),
                                         certificate_chain=read(tls_cert))
    return mod.secure_channel(target, creds, options=opts)


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token` (empty token: none)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


# ---------------------------------------------------------------------------------- the caller

_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("uwrt_caller", default=None)


def current_caller() -> Caller | None:
    """The authenticated caller of the RPC being handled; None when auth is off."""
    return _CALLER.get()


def has_role(role: str) -> bool:
    """Does the current caller hold `role`? False when auth is off (no caller)."""
    c = _CALLER.get()
    return c is not None and role in c.roles


def may_set_priority() -> bool:
    """Is a request's priority > 0 honoured? Always with auth off; else only with "priority"."""
    c = _CALLER.get()
    return c is None or "priority" in c.roles


def may_introspect(sec: SecurityConfig) -> bool:
    """Does the current caller get the full GetModelInfo? With model_info_exposure = "full", or
    as a caller with "introspect"."""
    return sec.model_info_exposure == "full" or has_role("introspect")


async def require_role(context: grpc.aio.ServicerContext, role: str) -> Caller | None:
    """In a handler: abort with PERMISSION_DENIED unless auth is off or the caller holds `role`."""
    c = _CALLER.get()
    if c is not None and role not in c.roles:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"caller {c.name!r} lacks the role {role!r}")
    return c


# ----------------------------------------------------------------------------- the interceptor

class _Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorizes every RPC but health (see the module docstring).
    `on_denied(method, context, code, message)` is told of each refusal (rate-limited logging)."""

    TOKEN_CACHE_MAX = 256

    def __init__(self, sec: SecurityConfig, callers: Callers, *,
                 on_denied: Callable[[str, Any, grpc.StatusCode, str], None] | None = None) -> None:
        self.mode = sec.auth
        self.callers = callers
        self.on_denied = on_denied
        self._tokens: dict[str, Caller] = {}        # token -> caller, verified ones only
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        self.denied = {"unauthenticated": 0, "permission_denied": 0}

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        role = role_for(method)
        if role is OPEN:
            return handler
        if handler is None:     # no such method: say so only to a caller allowed to call it
            return self._unknown(method, role)
        hit = self._wrapped.get(method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        wrapped = self._wrap(handler, method, role)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def authenticate(self, context: Any) -> Caller:
        """The caller of `context`'s RPC; raises _Denied(UNAUTHENTICATED)."""
        if self.mode in ("token", "any"):
            token = _bearer(context.invocation_metadata())
            if token is not None:
                caller = self._tokens.get(token)
                if caller is None:
                    caller = self.callers.by_token_sha256.get(token_sha256(token))
                    if caller is None:
                        raise _Denied(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid")
                    if len(self._tokens) >= self.TOKEN_CACHE_MAX:
                        self._tokens.clear()
                    self._tokens[token] = caller
                return caller
        if self.mode in ("mtls", "any"):
            for ident in context.peer_identities() or ():
                caller = self.callers.by_identity.get(ident.decode("utf-8", "replace"))
                if caller is not None:
                    return caller
            if self.mode == "mtls":
                raise _Denied(grpc.StatusCode.UNAUTHENTICATED,
                              "the client certificate's identity is not a known caller")
        raise _Denied(grpc.StatusCode.UNAUTHENTICATED, "credentials required: an `authorization: Bearer "
                      "<token>` header" + (" or a client certificate" if self.mode == "any" else ""))

    def _check(self, context: Any, method: str, role: str) -> Caller:
        try:
            caller = self.authenticate(context)
            if role and role not in caller.roles:
                raise _Denied(grpc.StatusCode.PERMISSION_DENIED,
                              f"caller {echo(caller.name)!r} lacks the role {role!r} needed for {method}")
        except _Denied as d:
            self.denied["unauthenticated" if d.code == grpc.StatusCode.UNAUTHENTICATED else "permission_denied"] += 1
            if self.on_denied is not None:
                self.on_denied(method, context, d.code, str(d))
            raise
        _CALLER.set(caller)
        return caller

    def _wrap(self, h: grpc.RpcMethodHandler, method: str, role: str) -> grpc.RpcMethodHandler:
        check = self._check
        if h.unary_unary is not None or h.stream_unary is not None:
            behavior = h.unary_unary or h.stream_unary

            async def unary(request: Any, context: Any) -> Any:
                try:
                    check(context, method, role)
                except _Denied as d:
                    await context.abort(d.code, str(d))
                return await behavior(request, context)
            make = grpc.unary_unary_rpc_method_handler if h.unary_unary else grpc.stream_unary_rpc_method_handler
            return make(unary, request_deserializer=h.request_deserializer,
                        response_serializer=h.response_serializer)
        sbehavior = h.unary_stream or h.stream_stream

        async def stream(request: Any, context: Any) -> Any:
            try:
                check(context, method, role)
            except _Denied as d:
                await context.abort(d.code, str(d))
            async for resp in sbehavior(request, context):
                yield resp
        make = grpc.unary_stream_rpc_method_handler if h.unary_stream else grpc.stream_stream_rpc_method_handler
        return make(stream, request_deserializer=h.request_deserializer, response_serializer=h.response_serializer)

    def _unknown(self, method: str, role: str) -> grpc.RpcMethodHandler:
        check = self._check

        async def unknown(request_iterator: Any, context: Any) -> None:
            try:
                check(context, method, role)
            except _Denied as d:
                await context.abort(d.code, str(d))
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        return grpc.stream_stream_rpc_method_handler(unknown)


def _bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for k, v in metadata or ():
        if k == "authorization":
            if isinstance(v, bytes):
                v = v.decode("utf-8", "replace")
            scheme, _, token = v.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""          # present but malformed: never valid
    return None


def interceptors(sec: SecurityConfig, *, on_denied: Callable[[str, Any, grpc.StatusCode, str], None] | None = None
                 ) -> list[AuthInterceptor]:
    """The server's interceptors for `sec` (none when auth is off). Raises SecurityError."""
    if sec.auth == "none":
        return []
    return [AuthInterceptor(sec, load_callers(sec.auth_file), on_denied=on_denied)]


# ---------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m uwrt.runtime.serving.security",
                                 description="Make a bearer token for a caller: prints the token once (give it "
                                             "to the caller) and the [[caller]] entry for the auth_file (which "
                                             "holds only the token's SHA-256).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("token", help="a new random token and its auth_file entry")
    t.add_argument("--name", required=True, help="the caller's name (logs, errors)")
    t.add_argument("--roles", required=True, help=f"comma-separated roles: {', '.join(ROLES)}")
    args = ap.parse_args(argv)
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    bad = [r for r in roles if r not in ROLES]
    if bad:
        print(f"error: unknown roles {bad}; roles: {', '.join(ROLES)}", file=sys.stderr)
        return 2
    token = secrets.token_urlsafe(32)
    print(f"token (give it to {args.name}; it is not stored anywhere): {token}", file=sys.stderr)
    print(f"[[caller]]\nname = {json.dumps(args.name)}\nroles = {json.dumps(roles)}\n"
          f'token_sha256 = "{token_sha256(token)}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
