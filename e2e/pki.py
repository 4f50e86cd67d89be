"""Certificates of the local control plane (the ``openssl`` command line) and kubeconfigs."""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

from e2e.procs import ClusterError

_OPENSSL_CONF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
authorityKeyIdentifier = keyid
subjectAltName = @alt_names
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
[alt_names]
DNS.1 = localhost
DNS.2 = kubernetes
DNS.3 = kubernetes.default
DNS.4 = kubernetes.default.svc
DNS.5 = kubernetes.default.svc.cluster.local
IP.1 = 127.0.0.1
IP.2 = {service_ip}
"""

# client certificates: file stem -> (CN, O)
CLIENT_CERTS = {
    "admin": ("kubernetes-admin", "system:masters"),
    "kube-controller-manager": ("system:kube-controller-manager", None),
    "kube-scheduler": ("system:kube-scheduler", None),
    "kwok": ("kwok-controller", "system:masters"),
    # writes PVs and pod status of every namespace, as a storage provisioner and kubelet do
    "node-agent": ("omni-node-agent", "system:masters"),
}


class Pki:
    """A CA, the apiserver's serving certificate, client certificates, the service-account key."""

    def __init__(self, directory: Path, *, cluster_name: str, service_ip: str):
        self.dir = directory
        self.cluster_name = cluster_name
        self.service_ip = service_ip

    def path(self, name: str) -> Path:
        return self.dir / name

    def complete(self) -> bool:
        names = ["ca.crt", "ca.key", "apiserver.crt", "apiserver.key", "sa.key", "sa.pub"]
        names += [f"{n}.{ext}" for n in CLIENT_CERTS for ext in ("crt", "key")]
        return all(self.path(n).exists() for n in names)

    def _openssl(self, *args: str) -> None:
        try:
            subprocess.run(["openssl", *args], cwd=self.dir, check=True, capture_output=True, text=True)
        except FileNotFoundError as e:
            raise ClusterError("the `openssl` command is needed to create certificates") from e
        except subprocess.CalledProcessError as e:
            raise ClusterError(f"openssl {' '.join(args)} failed:\n{e.stderr}") from e

    def _ec_key(self, name: str) -> None:
        self._openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name)

    def _sign(self, stem: str, subject: str, section: str) -> None:
        self._ec_key(f"{stem}.key")
        self._openssl("req", "-new", "-config", "openssl.cnf", "-key", f"{stem}.key", "-subj", subject,
                      "-out", f"{stem}.csr")
        self._openssl(
            "x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-set_serial", "0x" + secrets.token_hex(16), "-days", "3650", "-sha256",
            "-extfile", "openssl.cnf", "-extensions", section, "-out", f"{stem}.crt",
        )
        self.path(f"{stem}.csr").unlink()

    def create(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        os.chmod(self.dir, 0o700)
        self.path("openssl.cnf").write_text(_OPENSSL_CONF.format(service_ip=self.service_ip))
        self._ec_key("ca.key")
        self._openssl(
            "req", "-new", "-x509", "-config", "openssl.cnf", "-key", "ca.key",
            "-subj", f"/CN={self.cluster_name}-ca", "-days", "3650", "-sha256", "-extensions", "ca", "-out", "ca.crt",
        )
        self._sign("apiserver", "/CN=kube-apiserver", "server")
        for stem, (cn, org) in CLIENT_CERTS.items():
            self._sign(stem, f"/CN={cn}" + (f"/O={org}" if org else ""), "client")
        # service-account token signing key (RS256)
        self._openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key")
        self._openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub")

    def kubeconfig(self, server: str, client: str) -> dict[str, Any]:
        """A kubeconfig (certificates inline) for one of ``CLIENT_CERTS``."""
        def b64(p: Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        name = self.cluster_name
        user = {"client-certificate-data": b64(self.path(f"{client}.crt")),
                "client-key-data": b64(self.path(f"{client}.key"))}
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": name, "cluster": {"server": server,
                                                    "certificate-authority-data": b64(self.path("ca.crt"))}}],
            "users": [{"name": client, "user": user}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": client}}],
            "current-context": name,
            "preferences": {},
        }
