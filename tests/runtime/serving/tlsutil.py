"""Test certificates, made at test time with `cryptography` (no key is ever committed): a CA, a
server certificate for localhost / 127.0.0.1, client certificates with a DNS SAN or only a CN."""
from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Issued:
    cert: pathlib.Path
    key: pathlib.Path


@dataclass
class CA:
    name: str
    cert_obj: x509.Certificate
    key_obj: ec.EllipticCurvePrivateKey
    cert: pathlib.Path


def _write(path: pathlib.Path, data: bytes, mode: int) -> pathlib.Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(out: pathlib.Path, name: str = "uwrt test CA") -> CA:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    slug = name.replace(" ", "-")
    return CA(name, cert, key, _write(out / f"{slug}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644))


def issue(ca: CA, out: pathlib.Path, cn: str, *, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
          client: bool = False) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
         .issuer_name(ca.cert_obj.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                               else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = b.sign(ca.key_obj, hashes.SHA256())
    slug = cn.replace(" ", "-")
    return Issued(_write(out / f"{slug}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644),
                  _write(out / f"{slug}.key", _key_pem(key), 0o600))


def server_cert(ca: CA, out: pathlib.Path) -> Issued:
    return issue(ca, out, "uwrt-test-server", dns=("localhost",), ips=("127.0.0.1",))
