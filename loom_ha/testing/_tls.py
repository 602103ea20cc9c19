"""Throw-away TLS material for test servers: a self-signed CA and a 127.0.0.1 server certificate.

Generated with the `openssl` CLI so that no Python crypto package is needed.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TlsFiles", "make_test_certificates"]

_SERVER_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the PEM files a TLS test server uses."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        """An `SSLContext` that trusts only this CA (hostname 127.0.0.1 is in the SAN)."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_test_certificates(directory: Path, *, days: int = 7) -> TlsFiles:
    """Create (or reuse) `ca.crt`, `server.crt` and `server.key` in `directory`.

    Raises:
        FileNotFoundError: `openssl` is not installed.
        subprocess.CalledProcessError: openssl failed (its stderr is in the exception).
    """
    files = TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    if all(path.exists() for path in (files.ca_file, files.cert_file, files.key_file)):
        return files
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("openssl not found: apt-get install openssl")
    ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_key = directory / "ca.key"
    csr = directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text(_SERVER_EXTENSIONS)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=directory)

    run("req", "-x509", *ec_key, "-keyout", str(ca_key), "-out", str(files.ca_file),
        "-days", str(days), "-subj", "/CN=loom-ha test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    run("req", *ec_key, "-keyout", str(files.key_file), "-out", str(csr),
        "-subj", "/CN=127.0.0.1")  # fmt: skip
    run("x509", "-req", "-in", str(csr), "-CA", str(files.ca_file), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(files.cert_file), "-days", str(days),
        "-extfile", str(ext))  # fmt: skip
    files.key_file.chmod(0o600)
    return files
