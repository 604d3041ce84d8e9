"""Optional publisher signatures of model bundles (ed25519, through the `cryptography` library).

A bundle's manifest digest (``integrity.manifest_sha256``) covers every byte of the manifest, and the
manifest lists the sha256 of every file (weights, model card), so one signature of that digest (with
the signer's name and the time, signed too) covers the whole bundle. The signature lives next to the manifest in ``signature.json``::

    {"format": "headct-molre-signature", "version": 1, "algorithm": "ed25519",
     "public_key": "ed25519:<base64 of the 32-byte key>", "key_id": "<16 hex>", "signer": "...",
     "signed_at": "...", "manifest_sha256": "<64 hex>", "signature": "<base64 of 64 bytes>"}

What a signature adds to the digest: anyone can edit a manifest and recompute its digest, but only the
holder of the private key can make a signature that verifies. So "signed by key X, which you trust"
tells a colleague's model from a modified copy; "signed by an unknown key" only says the bundle is
unchanged since that key signed it. Keys: ``headct-molre keygen --out KEY`` writes the private key
``KEY`` (PEM, readable by its owner only) and the public key ``KEY.pub`` (one ``ed25519:...`` line, to
hand out). Trusted keys: a file of such lines (``#`` comments allowed) or a folder of ``*.pub`` files.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

SIGNATURE_FILE = "signature.json"
SIGNATURE_FORMAT = "headct-molre-signature"
SIGNATURE_VERSION = 1
KEY_PREFIX = "ed25519:"
MAX_SIGNATURE_BYTES = 64 * 1024
_CONTEXT = b"headct-molre-bundle-signature-v1\n"


class SignatureError(ValueError):
    """A signature or key that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class SignatureStatus:
    """``signed``: a signature.json is present and verifies; ``key_id``/``signer``: who signed;
    ``trusted``: True/False when trusted keys were given, None otherwise."""

    signed: bool
    key_id: str | None = None
    signer: str | None = None
    signed_at: str | None = None
    trusted: bool | None = None

    def describe(self) -> str:
        if not self.signed:
            return "UNSIGNED (no publisher signature: integrity is checked, origin is not)"
        who = f"key {self.key_id}" + (f" ({self.signer})" if self.signer else "")
        trust = {True: ", a trusted key", False: ", NOT one of the trusted keys", None: ""}[self.trusted]
        return f"signed by {who} on {self.signed_at}{trust}"


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as error:  # pragma: no cover - a dependency of the package
        raise SignatureError("bundle signatures need the 'cryptography' package (pip install cryptography)") from error
    return ed25519, serialization, InvalidSignature


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def format_public_key(public_raw: bytes) -> str:
    return KEY_PREFIX + base64.b64encode(public_raw).decode("ascii")


def parse_public_key(text: str, where: str) -> bytes:
    text = text.strip()
    if not text.startswith(KEY_PREFIX):
        raise SignatureError(f"{where}: {text[:40]!r} is not an '{KEY_PREFIX}<base64>' public key")
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX):], validate=True)
    except ValueError as error:
        raise SignatureError(f"{where}: the public key is not valid base64") from error
    if len(raw) != 32:
        raise SignatureError(f"{where}: an ed25519 public key has 32 bytes, this one {len(raw)}")
    return raw


def generate_keypair(private_path: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new private key (PEM, mode 0600) and ``<private>.pub``; refuses to overwrite."""
    ed25519, serialization, _ = _crypto()
    private_path = Path(private_path).expanduser()
    public_path = Path(f"{private_path}.pub")
    for path in (private_path, public_path):
        if path.exists():
            raise SignatureError(f"{path} already exists; choose another --out (keys are never overwritten)")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    public_path.write_text(format_public_key(raw) + "\n", encoding="ascii")
    return private_path, public_path


def _load_private_key(path: str | os.PathLike):
    ed25519, serialization, _ = _crypto()
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SignatureError(f"cannot read the private key {path}: {error.strerror or error}") from error
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise SignatureError(f"{path} is not an unencrypted PEM private key ({error})") from error
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an ed25519 key; make one with `headct-molre keygen`")
    return key


def read_trusted_keys(source: str | os.PathLike) -> dict[str, bytes]:
    """key id -> raw public key, from a file of ``ed25519:`` lines or a folder of ``*.pub`` files."""
    source = Path(source).expanduser()
    if source.is_dir():
        files = sorted(p for p in source.glob("*.pub") if p.is_file())
    elif source.is_file():
        files = [source]
    else:
        raise SignatureError(f"trusted keys {source}: no such file or folder")
    keys: dict[str, bytes] = {}
    for path in files:
        if path.stat().st_size > MAX_SIGNATURE_BYTES:
            raise SignatureError(f"{path}: too large for a list of public keys")
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if line:
                raw = parse_public_key(line.split()[0], f"{path}, line {number}")
                keys[key_id(raw)] = raw
    if not keys:
        raise SignatureError(f"trusted keys {source}: no '{KEY_PREFIX}' public key found")
    return keys


def _message(manifest_sha256: str, signer: str, signed_at: str) -> bytes:
    """What is signed: the manifest digest and the signer's name and time (so neither can be edited)."""
    fields = {"manifest_sha256": manifest_sha256, "signer": signer, "signed_at": signed_at}
    return _CONTEXT + json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sign_manifest_digest(folder: str | os.PathLike, manifest_sha256: str, private_key_path, *,
                         signer: str | None = None) -> Path:
    """Write ``signature.json`` for a bundle whose (verified) manifest digest is ``manifest_sha256``."""
    _, serialization, _ = _crypto()
    key = _load_private_key(private_key_path)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    signed_at = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    signer = (signer or "")[:200]
    document = {
        "format": SIGNATURE_FORMAT, "version": SIGNATURE_VERSION, "algorithm": "ed25519",
        "public_key": format_public_key(raw), "key_id": key_id(raw), "signer": signer, "signed_at": signed_at,
        "manifest_sha256": manifest_sha256,
        "signature": base64.b64encode(key.sign(_message(manifest_sha256, signer, signed_at))).decode("ascii"),
    }
    from ..atomic_files import atomic_write_text

    target = Path(folder) / SIGNATURE_FILE
    atomic_write_text(target, json.dumps(document, indent=2) + "\n")
    return target


def check_signature(folder: str | os.PathLike, manifest_sha256: str,
                    trusted_keys: dict[str, bytes] | None = None) -> SignatureStatus:
    """The signature status of a bundle folder. No signature.json: unsigned. A signature.json that does
    not verify against this manifest is a SignatureError (the bundle was changed after signing)."""
    ed25519, _, invalid_signature = _crypto()
    path = Path(folder) / SIGNATURE_FILE
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise SignatureError(f"{path} is not a plain file")
    if not path.exists():
        return SignatureStatus(signed=False, trusted=False if trusted_keys is not None else None)
    if path.stat().st_size > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{path}: {path.stat().st_size} bytes is too large for a signature")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise SignatureError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(document, dict) or document.get("format") != SIGNATURE_FORMAT \
            or document.get("version") != SIGNATURE_VERSION or document.get("algorithm") != "ed25519":
        raise SignatureError(f"{path} is not a {SIGNATURE_FORMAT} version {SIGNATURE_VERSION} (ed25519) file")
    raw = parse_public_key(str(document.get("public_key", "")), str(path))
    if document.get("manifest_sha256") != manifest_sha256:
        raise SignatureError(f"{path}: the signature is for another manifest; the bundle was changed after it was "
                             "signed. Do not use it as the signed model; get a fresh copy or ask its publisher.")
    signer, signed_at = document.get("signer", ""), document.get("signed_at", "")
    if not isinstance(signer, str) or not isinstance(signed_at, str):
        raise SignatureError(f"{path}: signer and signed_at must be text")
    try:
        signature = base64.b64decode(str(document.get("signature", "")), validate=True)
        ed25519.Ed25519PublicKey.from_public_bytes(raw).verify(signature, _message(manifest_sha256, signer, signed_at))
    except (ValueError, invalid_signature):
        raise SignatureError(f"{path}: the signature does not verify; the bundle or its signature was altered") from None
    ident = key_id(raw)
    return SignatureStatus(signed=True, key_id=ident, signer=signer[:200] or None, signed_at=signed_at[:64],
                           trusted=None if trusted_keys is None else ident in trusted_keys)
