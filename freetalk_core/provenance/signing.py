"""C2PA provenance of an output MP4: the manifest, the signer, and reading it back.

Signing uses the user's certificate chain and private key when given (arguments, or
`FREETALK_C2PA_CERT` / `FREETALK_C2PA_KEY`: PEM files, ES256 unless `FREETALK_C2PA_ALG`
says otherwise); otherwise a local ES256 CA and leaf signer created once in the user's
config directory (`$FREETALK_CONFIG_DIR`, else `$XDG_CONFIG_HOME/freetalk`, else
`~/.config/freetalk`). A local signer's manifests validate but are reported as self-issued:
no trust list knows that CA.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from freetalk_core.errors import FreetalkError

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
GENERATION_LABEL = "org.freetalk.generation"
LOCAL_ISSUER = "freetalk local CA (self-issued)"

MIME_TYPES = {".mp4": "video/mp4", ".mov": "video/quicktime", ".m4a": "audio/mp4", ".wav": "audio/wav",
              ".mp3": "audio/mpeg", ".avi": "video/x-msvideo", ".jpg": "image/jpeg", ".png": "image/png"}


class SigningError(FreetalkError):
    """The signing certificate or key cannot be used."""


@dataclass(frozen=True)
class Ingredient:
    """One input of a generation: its role (identity, lip_ref, audio) and file."""

    role: str
    path: str
    sha256: str


def config_dir() -> Path:
    """Where freetalk keeps per-user state (the local signer)."""
    if os.environ.get("FREETALK_CONFIG_DIR"):
        return Path(os.environ["FREETALK_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or ""
    if not base:
        home = os.environ.get("HOME") or ""
        if not home or not os.path.isdir(home) or not os.access(home, os.W_OK):
            # An empty or read-only HOME (CI, containers): a per-user folder in the temp dir.
            return Path(tempfile.gettempdir()) / f"freetalk-config-{os.getuid()}"
        base = os.path.join(home, ".config")
    return Path(base) / "freetalk"


def _local_signer_files(directory: Path) -> tuple[bytes, bytes]:
    """`(certificate chain PEM, private key PEM)` of the local signer, created on first use."""
    chain_path, key_path = directory / "chain.pem", directory / "key.pem"
    if chain_path.is_file() and key_path.is_file():
        return chain_path.read_bytes(), key_path.read_bytes()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "freetalk local CA"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, LOCAL_ISSUER)])
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "freetalk local signer"),
                           x509.NameAttribute(NameOID.ORGANIZATION_NAME, LOCAL_ISSUER)])

    def usage(sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=not sign,
                             crl_sign=not sign, encipher_only=False, decipher_only=False)

    def base(subject, key) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=3650))
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))

    ca = (base(ca_name, ca_key).add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(False), critical=True).sign(ca_key, hashes.SHA256()))
    leaf = (base(leaf_name, leaf_key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    chain = leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    key = leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    # Written in a private temporary folder renamed into place in one step, so concurrent
    # first uses end with one matching certificate and key.
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".c2pa-signer-", dir=directory.parent))
    (tmp / "chain.pem").write_bytes(chain)
    fd = os.open(tmp / "key.pem", os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    try:
        os.rename(tmp, directory)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return (directory / "chain.pem").read_bytes(), (directory / "key.pem").read_bytes()
    return chain, key


def make_signer(cert: str | Path | None = None, key: str | Path | None = None):
    """A `c2pa.Signer`: the user's certificate chain and key (arguments, else
    `FREETALK_C2PA_CERT` / `FREETALK_C2PA_KEY`), else the local self-issued one."""
    import c2pa

    cert = cert or os.environ.get("FREETALK_C2PA_CERT")
    key = key or os.environ.get("FREETALK_C2PA_KEY")
    if bool(cert) != bool(key):
        raise SigningError("give both a signing certificate and its key (FREETALK_C2PA_CERT and "
                           "FREETALK_C2PA_KEY), or neither to use the local signer")
    if cert:
        try:
            chain, private = Path(cert).read_bytes(), Path(key).read_bytes()
        except OSError as exc:
            raise SigningError(f"cannot read the signing certificate or key: {exc}") from exc
    else:
        chain, private = _local_signer_files(config_dir() / "c2pa-signer")
    alg = getattr(c2pa.C2paSigningAlg, os.environ.get("FREETALK_C2PA_ALG", "ES256").upper(), None)
    if alg is None:
        raise SigningError(f"FREETALK_C2PA_ALG must be one of {[a.name for a in c2pa.C2paSigningAlg]}")
    try:
        return c2pa.Signer.from_info(c2pa.C2paSignerInfo(alg, chain, private, None))
    except c2pa.C2paError as exc:
        raise SigningError(f"the signing certificate or key is unusable: {exc}") from exc


def manifest_definition(title: str, version: str, ingredients: list[Ingredient],
                        parameters: dict, models: dict, watermark_id: str | None) -> dict:
    """The C2PA manifest of an output: the edit action with its digital source type, and
    freetalk's own assertion (inputs with hashes, models with file hashes, parameters,
    watermark id)."""
    agent = {"name": "freetalk", "version": version}
    return {
        "claim_generator_info": [agent],
        "title": title,
        "format": "video/mp4",
        "assertions": [
            {"label": "c2pa.actions.v2", "data": {"actions": [{
                "action": "c2pa.edited",
                "digitalSourceType": DIGITAL_SOURCE_TYPE,
                "softwareAgent": agent,
                "description": "mouth region regenerated by a diffusion model so the identity "
                               "speaks with the lip reference's motion",
                "parameters": {"synthetic": True, **parameters},
            }]}},
            {"label": GENERATION_LABEL, "data": {
                "synthetic": True,
                "inputs": [{"role": i.role, "file": Path(i.path).name, "sha256": i.sha256}
                           for i in ingredients],
                "models": models, "parameters": parameters,
                "watermark": ({"method": "freetalk-stdm-1", "id": watermark_id}
                              if watermark_id else None),
            }},
        ],
    }


def sign_mp4(path: str | Path, definition: dict, ingredients: list[Ingredient],
             cert: str | Path | None = None, key: str | Path | None = None) -> None:
    """Embed a signed manifest in the MP4 at `path` (rewritten in place, atomically).
    The identity video is the parent ingredient; the lip reference and audio are inputs."""
    import c2pa

    path = Path(path)
    signer = make_signer(cert, key)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.signed.mp4")
    try:
        with c2pa.Builder(definition) as builder:
            builder.set_intent(c2pa.C2paBuilderIntent.EDIT,
                               c2pa.C2paDigitalSourceType.COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA)
            for ing in ingredients:
                mime = MIME_TYPES.get(Path(ing.path).suffix.lower(), "video/mp4")
                spec = {"title": Path(ing.path).name, "format": mime,
                        "relationship": "parentOf" if ing.role == "identity" else "inputTo",
                        "description": f"{ing.role} (sha256 {ing.sha256})",
                        "metadata": {"org.freetalk.role": ing.role, "org.freetalk.sha256": ing.sha256}}
                with open(ing.path, "rb") as source:
                    try:
                        builder.add_ingredient(spec, mime, source)
                    except c2pa.C2paError:
                        # A format the library cannot parse is still recorded, by name and hash.
                        source.seek(0)
                        builder.add_ingredient(spec, "application/octet-stream", source)
            with open(path, "rb") as source, open(tmp, "w+b") as dest:
                builder.sign(signer, "video/mp4", source, dest)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        signer.close()


def file_sha256(path: Path, _cache: dict = {}) -> str:
    """sha256 of a file, remembered per (path, size, mtime) for the process."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _cache[key] = digest.hexdigest()
    return _cache[key]


def model_hashes(models_dir: str | Path, components: list[str]) -> dict:
    """`{component: {relative file: sha256}}` of the weight and config files used."""
    root = Path(models_dir)
    out = {}
    for component in components:
        folder = root / component
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
        out[component] = {str(p.relative_to(folder)): file_sha256(p) for p in files}
    return out


@dataclass
class ManifestReport:
    """What the C2PA manifest of a file says."""

    present: bool
    valid: bool = False
    state: str | None = None
    problems: list[str] = field(default_factory=list)
    signer: str | None = None
    self_issued: bool = False
    actions: list[str] = field(default_factory=list)
    digital_source_types: list[str] = field(default_factory=list)
    ingredients: list[str] = field(default_factory=list)
    generation: dict | None = None
    error: str | None = None


def read_manifest(path: str | Path) -> ManifestReport:
    """Read and validate the active manifest of `path`. `present` is False when there is none
    (a re-encode strips it); `error` is set when the file cannot be read at all."""
    import c2pa

    try:
        reader = c2pa.Reader.try_create(str(path))
    except c2pa.C2paError as exc:
        return ManifestReport(present=False, error=str(exc).strip().splitlines()[0])
    if reader is None:
        return ManifestReport(present=False)
    with reader:
        state = reader.get_validation_state()
        results = reader.get_validation_results() or {}
        active = reader.get_active_manifest() or {}
    failures = (results.get("activeManifest") or {}).get("failure") or []
    problems = [f"{f.get('code')}: {f.get('explanation', '')}".strip() for f in failures]
    report = ManifestReport(present=True, state=state, problems=problems,
                            valid=state in ("Valid", "Trusted"))
    info = active.get("signature_info") or {}
    report.signer = " / ".join(x for x in (info.get("common_name"), info.get("issuer")) if x) or None
    report.self_issued = state != "Trusted" and info.get("issuer") == LOCAL_ISSUER
    for assertion in active.get("assertions", []):
        if assertion.get("label", "").startswith("c2pa.actions"):
            for action in assertion.get("data", {}).get("actions", []):
                report.actions.append(action.get("action", "?"))
                if action.get("digitalSourceType"):
                    report.digital_source_types.append(action["digitalSourceType"])
        elif assertion.get("label") == GENERATION_LABEL:
            report.generation = assertion.get("data")
    report.ingredients = [f"{i.get('title')} ({i.get('relationship')})" for i in active.get("ingredients", [])]
    return report
