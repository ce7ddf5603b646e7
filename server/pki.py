"""`python -m server.pki`: the certificates and keys of a federation, in one folder.

    python -m server.pki ca        --out pki                      # pki/ca.crt, pki/ca.key
    python -m server.pki superlink --out pki --host lab.example.org [--host ...] [--ip 10.0.0.5]
                                                                  # pki/superlink.crt, pki/superlink.key
    python -m server.pki site unicamp [hcfmrp ...] --out pki      # pki/sites/unicamp.key, .pub
    python -m server.pki register --out pki --connection mrsfm [unicamp ...]
                                                                  # flwr supernode register, per site
    sudo python -m server.pki install --out pki --dest /etc/mrsfm/pki --owner mrsfm   # (or --owner 10001)
                                                                  # the SuperLink's three files, for its service user

- The CA signs the SuperLink's TLS certificate; sites verify the SuperLink with `ca.crt`
  (`site.root_certificates`). `ca.key` never leaves the lab.
- The SuperLink certificate names every `--host` (DNS) and `--ip` (IP) the sites dial, plus always
  DNS:localhost, IP:127.0.0.1 and IP:::1: the SuperLink's own `flower-superexec` connects to it
  over loopback with TLS, verified against the same CA (also when it listens on 0.0.0.0).
- A site key is an EC P-384 key pair in OpenSSH format, the only format flwr 1.41 reads:
  `flower-supernode --auth-supernode-private-key sites/NAME.key` (OpenSSH private key) and
  `flwr supernode register sites/NAME.pub CONNECTION` (OpenSSH public key). The private key belongs
  to the site: made there, or made at the lab and sent over a secure channel.

- `install` copies what the SuperLink reads (ca.crt, superlink.crt, superlink.key; never ca.key) to
  the folder its service reads (`/etc/mrsfm/pki`), the key mode 0400 and owned by the service's user:
  `mrsfm` for the systemd unit, uid 10001 for the container image. It checks first that the key
  belongs to the certificate and that the CA signed it.

Private keys are written with mode 0600. Nothing is overwritten without `--force`, and every file
is checked before any is written, so a refused command leaves the folder as it was. Errors are one
line on stderr, naming the file, and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import datetime as dt
import grp
import ipaddress
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mrsfm_model.files import write_atomic

PROG = "python -m server.pki"
CURVE = ec.SECP384R1  # P-384: TLS keys and site keys alike (Flower asks for a NIST curve, P-384 suggested)
LOOPBACK_HOSTS, LOOPBACK_IPS = ("localhost",), ("127.0.0.1", "::1")
CA_DAYS, SUPERLINK_DAYS = 3650, 825
INSTALL_DEST = "/etc/mrsfm/pki"  # where the kit's SuperLink (compose file, systemd unit) reads its files
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_SITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PKIError(Exception):
    """A problem the operator can fix, said in one line (naming the file)."""


# -- paths -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    out: Path

    @property
    def ca_crt(self) -> Path:
        return self.out / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.out / "ca.key"

    @property
    def superlink_crt(self) -> Path:
        return self.out / "superlink.crt"

    @property
    def superlink_key(self) -> Path:
        return self.out / "superlink.key"

    @property
    def sites(self) -> Path:
        return self.out / "sites"

    def site_key(self, site: str) -> Path:
        return self.sites / f"{site}.key"

    def site_pub(self, site: str) -> Path:
        return self.sites / f"{site}.pub"


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    """All-or-nothing: refuse before anything is written."""
    if force:
        return
    for p in paths:
        if p.exists():
            raise PKIError(f"{p} already exists; not overwritten (pass --force to replace it)")


def _write(path: Path, data: bytes, private: bool) -> None:
    """Atomic write; private files are 0600 from the first byte."""
    write_atomic(path, data, 0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- CA ----------------------------------------------------------------------------------------------
def make_ca(out: str | Path, name: str = "mrsfm federation CA", days: int = CA_DAYS, force: bool = False) -> Layout:
    """A self-signed CA: out/ca.crt (public, for every site) and out/ca.key (0600, stays at the lab)."""
    lay = Layout(Path(out))
    _refuse_existing([lay.ca_crt, lay.ca_key], force)
    key = ec.generate_private_key(CURVE())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA384()))
    _write(lay.ca_key, _pem_key(key), private=True)
    _write(lay.ca_crt, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return lay


def load_ca(out: str | Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    lay = Layout(Path(out))
    for p in (lay.ca_crt, lay.ca_key):
        if not p.is_file():
            raise PKIError(f"{p} not found; make the CA first: {PROG} ca --out {lay.out}")
    try:
        cert = x509.load_pem_x509_certificate(lay.ca_crt.read_bytes())
    except (ValueError, OSError) as exc:
        raise PKIError(f"{lay.ca_crt}: not a PEM certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(lay.ca_key.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        raise PKIError(f"{lay.ca_key}: not an unencrypted PEM private key ({exc})") from None
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo):
        raise PKIError(f"{lay.ca_key} does not belong to {lay.ca_crt}")
    return cert, key


# -- SuperLink ---------------------------------------------------------------------------------------
def check_host(host: str) -> str:
    """A DNS name for the certificate (no IPs, no wildcards, no ports); lower case."""
    name = host.strip().rstrip(".").lower()
    try:
        as_ip = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        as_ip = None
    if as_ip is not None:
        raise PKIError(f"--host {host!r} is an IP address; pass it as --ip {as_ip}")
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise PKIError(f"--host {host!r} is not a valid DNS name (letters, digits, '-' and '.', no port, "
                       "no wildcard)")
    return name


def check_ip(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip.strip().strip("[]")))
    except ValueError:
        raise PKIError(f"--ip {ip!r} is not an IP address") from None


def superlink_names(hosts: Sequence[str], ips: Sequence[str]) -> tuple[list[str], list[str]]:
    """The certificate's DNS and IP names: the requested ones first, then the loopback ones."""
    dns = list(dict.fromkeys([check_host(h) for h in hosts] + list(LOOPBACK_HOSTS)))
    ip = list(dict.fromkeys([check_ip(i) for i in ips] + list(LOOPBACK_IPS)))
    return dns, ip


def make_superlink(out: str | Path, hosts: Sequence[str], ips: Sequence[str] = (), days: int = SUPERLINK_DAYS,
                   force: bool = False) -> Layout:
    """out/superlink.crt (signed by out/ca.*) and out/superlink.key (0600) for the SuperLink's TLS."""
    lay = Layout(Path(out))
    dns, ip = superlink_names(hosts, ips)  # bad names first: nothing is read or written before
    ca_cert, ca_key = load_ca(lay.out)
    _refuse_existing([lay.superlink_crt, lay.superlink_key], force)
    key = ec.generate_private_key(CURVE())
    san = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ip]
    common_name = check_host(hosts[0]) if hosts else check_ip(ips[0]) if ips else LOOPBACK_HOSTS[0]
    not_after = min(_now() + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write(lay.superlink_key, _pem_key(key), private=True)
    _write(lay.superlink_crt, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return lay


# -- sites -------------------------------------------------------------------------------------------
def check_site(site: str) -> str:
    if not _SITE.match(site):
        raise PKIError(f"site name {site!r}: use letters, digits, '_', '-' and '.' (as in configs/site/NAME.yaml)")
    return site


def make_site(out: str | Path, site: str, force: bool = False) -> tuple[Path, Path]:
    """out/sites/SITE.key (OpenSSH EC private key, 0600) and out/sites/SITE.pub (OpenSSH public key)."""
    lay = Layout(Path(out))
    check_site(site)
    _refuse_existing([lay.site_key(site), lay.site_pub(site)], force)
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(lay.site_key(site), private, private=True)
    _write(lay.site_pub(site), public + f" mrsfm-{site}\n".encode(), private=False)
    return lay.site_key(site), lay.site_pub(site)


def make_sites(out: str | Path, sites: Sequence[str], force: bool = False) -> list[tuple[Path, Path]]:
    lay = Layout(Path(out))
    for site in sites:
        check_site(site)
    _refuse_existing([p for s in sites for p in (lay.site_key(s), lay.site_pub(s))], force)
    return [make_site(out, s, force=True) for s in sites]


def known_sites(out: str | Path) -> list[str]:
    """Sites with a public key under out/sites/."""
    return sorted(p.stem for p in Layout(Path(out)).sites.glob("*.pub"))


# -- registration ------------------------------------------------------------------------------------
@dataclass
class Registration:
    registered: dict[str, int] = field(default_factory=dict)  # site -> node id
    already: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # site -> why

    @property
    def ok(self) -> bool:
        return not self.failed


def flwr_executable() -> str:
    """`flwr` next to this Python (the venv's) first, then PATH."""
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    exe = shutil.which("flwr", path=path)
    if exe is None:
        raise PKIError("flwr not found next to this Python or on PATH; install mrsfm (pip install -e .)")
    return exe


def register(out: str | Path, connection: str, sites: Sequence[str] | None = None, env: dict | None = None,
             timeout_s: float = 60.0) -> Registration:
    """`flwr supernode register out/sites/SITE.pub CONNECTION --name SITE` for each site (default: every
    out/sites/*.pub). A key the SuperLink already knows counts as registered, not as a failure."""
    lay = Layout(Path(out))
    sites = list(sites) if sites else known_sites(out)
    if not sites:
        raise PKIError(f"no site keys in {lay.sites}; make them with: {PROG} site NAME --out {lay.out}")
    for site in sites:
        if not lay.site_pub(check_site(site)).is_file():
            raise PKIError(f"{lay.site_pub(site)} not found; make it with: {PROG} site {site} --out {lay.out}")
    exe, result = flwr_executable(), Registration()
    for site in sites:
        cmd = [exe, "supernode", "register", str(lay.site_pub(site).resolve()), connection, "--name", site,
               "--format", "json"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            result.failed[site] = f"flwr supernode register did not answer in {timeout_s:g} s"
            continue
        reply = _json_reply(res.stdout)
        text = " ".join((reply.get("error-message") or "", res.stdout, res.stderr)).strip()
        if res.returncode == 0 and reply.get("success"):
            result.registered[site] = int(reply.get("node-id", 0))
        elif "already in use" in text.lower():
            result.already.append(site)
        else:
            result.failed[site] = _one_line(reply.get("error-message") or res.stderr or res.stdout
                                            or f"exit code {res.returncode}")
    return result


def _json_reply(stdout: str) -> dict:
    """The JSON object `flwr ... --format json` prints (the last one, if colour text came before)."""
    start = stdout.find("{")
    while start != -1:
        try:
            value = json.loads(stdout[start:])
            return value if isinstance(value, dict) else {}
        except ValueError:
            start = stdout.find("{", start + 1)
    return {}


def _one_line(text: str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return " ".join(text.split())[:400]


# -- installing the SuperLink's files for its service --------------------------------------------------
def parse_owner(owner: str) -> tuple[int, int, str]:
    """USER, UID, USER:GROUP or UID:GID -> (uid, gid, words). A user's group defaults to its primary
    group; a bare UID without a user on this machine (the image's 10001) to the same number."""
    user, _, group = owner.partition(":")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise PKIError(f"--owner {owner!r}: no user {user!r} on this machine (make it first, e.g. useradd "
                           "--system mrsfm, or give a numeric UID such as 10001 for the container image)") from None
        entry = None
    uid = int(user) if user.isdigit() else entry.pw_uid
    if not group:
        gid = entry.pw_gid if entry is not None else uid
    elif group.isdigit():
        gid = int(group)
    else:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise PKIError(f"--owner {owner!r}: no group {group!r} on this machine") from None
    return uid, gid, f"{uid}:{gid}"


def _public_der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def install_superlink(out: str | Path, dest: str | Path, owner: str, force: bool = False) -> list[Path]:
    """Copy out/{ca.crt, superlink.crt, superlink.key} to dest/ for the SuperLink's service user:
    the certificates 0644, the key 0400, all three owned by `owner` (USER[:GROUP] or UID[:GID]);
    dest/ itself 0755. Never ca.key. Checks first: the files are there, the key belongs to the
    certificate, the CA signed it; and that nothing is overwritten without force."""
    lay, dest = Layout(Path(out)), Path(dest)
    uid, gid, _ = parse_owner(owner)
    for p in (lay.ca_crt, lay.superlink_crt, lay.superlink_key):
        if not p.is_file():
            raise PKIError(f"{p} not found; make it first ({PROG} ca / superlink --out {lay.out})")
    try:
        ca = x509.load_pem_x509_certificate(lay.ca_crt.read_bytes())
        cert = x509.load_pem_x509_certificate(lay.superlink_crt.read_bytes())
    except ValueError as exc:
        raise PKIError(f"{lay.out}: ca.crt or superlink.crt is not a PEM certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(lay.superlink_key.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"{lay.superlink_key}: not an unencrypted PEM private key ({exc})") from None
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise PKIError(f"{lay.superlink_key} does not belong to {lay.superlink_crt}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:  # InvalidSignature has no message
        raise PKIError(f"{lay.superlink_crt} was not signed by {lay.ca_crt} ({type(exc).__name__})") from None
    plan = [(lay.ca_crt, dest / "ca.crt", 0o644), (lay.superlink_crt, dest / "superlink.crt", 0o644),
            (lay.superlink_key, dest / "superlink.key", 0o400)]
    _refuse_existing([d for _, d, _ in plan], force)
    if (os.geteuid() != 0 and (uid, gid) != (os.geteuid(), os.getegid())
            and not (uid == os.geteuid() and gid in os.getgroups())):
        raise PKIError(f"giving the files to {owner} ({uid}:{gid}) needs root: run this command with sudo")
    dest.mkdir(parents=True, exist_ok=True)
    dest.chmod(0o755)
    for src, dst, mode in plan:
        write_atomic(dst, src.read_bytes(), mode)
        os.chown(dst, uid, gid)
    return [d for _, d, _ in plan]


# -- command line ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Certificates and SuperNode keys of the federation.")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{ca,superlink,site,register,install}")

    def common(p: argparse.ArgumentParser, force: bool = True) -> None:
        p.add_argument("--out", default="pki", help="the PKI folder (default: pki)")
        if force:
            p.add_argument("--force", action="store_true", help="replace existing files")

    p = sub.add_parser("ca", help="a new CA: OUT/ca.crt (give to every site) and OUT/ca.key (keep at the lab)")
    common(p)
    p.add_argument("--name", default="mrsfm federation CA", help="the CA's common name")
    p.add_argument("--days", type=int, default=CA_DAYS)

    p = sub.add_parser("superlink", help="OUT/superlink.crt + .key, signed by the CA, for the names the sites dial")
    common(p)
    p.add_argument("--host", action="append", default=[], help="a DNS name of the SuperLink (repeatable)")
    p.add_argument("--ip", action="append", default=[], help="an IP address of the SuperLink (repeatable)")
    p.add_argument("--days", type=int, default=SUPERLINK_DAYS)

    p = sub.add_parser("site", help="OUT/sites/NAME.key (the site's, 0600) and OUT/sites/NAME.pub (to register)")
    common(p)
    p.add_argument("names", nargs="+", metavar="NAME", help="site name(s), as in configs/site/NAME.yaml")

    p = sub.add_parser("register", help="flwr supernode register OUT/sites/NAME.pub CONNECTION, per site")
    common(p, force=False)
    p.add_argument("--connection", required=True, help="the SuperLink connection in $FLWR_HOME/config.toml")
    p.add_argument("names", nargs="*", metavar="NAME", help="sites to register (default: every OUT/sites/*.pub)")

    p = sub.add_parser("install", help="copy the SuperLink's ca.crt, superlink.crt and superlink.key (0400) to DEST "
                       "for its service user (needs sudo)")
    common(p)
    p.add_argument("--dest", default=INSTALL_DEST, help=f"the folder the SuperLink reads (default: {INSTALL_DEST})")
    p.add_argument("--owner", required=True, help="the SuperLink's user: mrsfm (systemd unit) or 10001 (container "
                   "image); USER[:GROUP] or UID[:GID]")

    args = parser.parse_args(argv)
    try:
        if args.cmd == "ca":
            lay = make_ca(args.out, name=args.name, days=args.days, force=args.force)
            print(f"CA: {lay.ca_crt} (give to every site and to the flwr CLI), {lay.ca_key} (0600, keep at the lab)")
        elif args.cmd == "superlink":
            if not args.host and not args.ip:
                raise PKIError("name the SuperLink as the sites dial it: --host lab.example.org and/or --ip 10.0.0.5")
            lay = make_superlink(args.out, args.host, args.ip, days=args.days, force=args.force)
            dns, ip = superlink_names(args.host, args.ip)
            print(f"SuperLink: {lay.superlink_crt}, {lay.superlink_key} (0600); names: "
                  + ", ".join([f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ip]))
        elif args.cmd == "site":
            for key, pub in make_sites(args.out, args.names, force=args.force):
                print(f"site {key.stem}: {key} (0600, the site's auth_private_key), {pub} (register at the lab)")
        elif args.cmd == "install":
            done = install_superlink(args.out, args.dest, args.owner, force=args.force)
            print(f"installed for {args.owner} ({parse_owner(args.owner)[2]}): "
                  + ", ".join(f"{p} ({p.stat().st_mode & 0o777:o})" for p in done))
        else:
            res = register(args.out, args.connection, args.names)
            for site, node in res.registered.items():
                print(f"registered {site} (node id {node})")
            for site in res.already:
                print(f"already registered {site}")
            for site, why in res.failed.items():
                print(f"FAILED {site}: {why}", file=sys.stderr)
            return 0 if res.ok else 1
    except PKIError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. --out not writable
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{PROG}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
