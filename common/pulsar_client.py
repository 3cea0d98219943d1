"""Every ``pulsar.Client`` of the fleet is made here, from a ``PulsarAccess``.

One place turns the settings into the client's arguments: the token
(``FEEDFLEET_PULSAR_TOKEN`` or ``FEEDFLEET_PULSAR_TOKEN_FILE``) as
``AuthenticationToken``, and with a ``pulsar+ssl://`` URL the CA file and hostname
check. The workers' sink, the benchmark's and the chaos run's consumers and the tests'
all connect the same way, so a broker that wants a token or TLS is reached by all of them.
"""

from __future__ import annotations

from typing import Any

import pulsar

from common.config import PulsarAccess


def pulsar_client_args(access: PulsarAccess) -> dict[str, Any]:
    """The keyword arguments of ``pulsar.Client`` that ``access`` calls for (the service
    URL included); the TLS ones only for a ``pulsar+ssl://`` URL."""
    args: dict[str, Any] = {"service_url": access.url}
    if access.token is not None:
        args["authentication"] = pulsar.AuthenticationToken(access.token)
    if access.uses_tls:
        args["tls_validate_hostname"] = access.tls_validate_hostname
        if access.tls_trust_certs is not None:
            args["tls_trust_certs_file_path"] = str(access.tls_trust_certs)
    return args


def new_pulsar_client(access: PulsarAccess | str, **options: Any) -> pulsar.Client:
    """A client for ``access`` (a bare URL: no token, no CA file), with the caller's own
    ``options`` (timeouts, threads, logger)."""
    if isinstance(access, str):
        access = PulsarAccess(access)
    return pulsar.Client(**pulsar_client_args(access), **options)
