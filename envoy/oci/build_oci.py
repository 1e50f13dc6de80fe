#!/usr/bin/env python3
"""Package webhook_emitter.wasm as an OCI image that Istio's WasmPlugin can pull (url: oci://...).

Standard library only; no Docker, no registry access. The image follows the *compat* variant of the Wasm image
specification (solo-io/wasm spec/spec-compat.md), which is what Istio's agent accepts first
(istio/istio pkg/wasm/imagefetcher.go, extractOCIStandardImage):

  * one layer, media type application/vnd.oci.image.layer.v1.tar+gzip, a tar holding one file: plugin.wasm
  * the manifest annotation module.wasm.image/variant=compat
  * an ordinary OCI image config (application/vnd.oci.image.config.v1+json)

Output, under --out (default target/oci):

  layout/                    an OCI image layout: oci-layout, index.json, blobs/sha256/<digest>...
  webhook-emitter-oci.tar    the same layout as one tar archive (skopeo's oci-archive: transport)
  wasmplugin.yaml            envoy/istio/wasmplugin.yaml with this image's url and manifest digest filled in
                             (only with --repository: a WasmPlugin pointing at the example registry would
                             fail its fetch in every pod, and Istio would answer 403 for the job service)

The build is deterministic: fixed mtimes, owners and modes, sorted entries, gzip header mtime 0 and no file
name, canonical JSON. The same .wasm always gives the same manifest digest (with the same zlib; Python uses the
system's), so the digest printed here can be written into the WasmPlugin before the image is pushed.

What the WasmPlugin needs: for an oci:// url, Istio compares `sha256` with the *manifest digest* of the image it
pulled (istio/istio pkg/wasm/cache.go: the digest returned by the image fetcher is img.Digest()), not with the
sha256 of the .wasm file. The .wasm's own sha256 is what `sha256` means for file:// and http(s):// urls.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

OCI_LAYOUT_VERSION = "1.0.0"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
WASM_NAME = "plugin.wasm"  # the file name the compat variant requires (and Istio looks for)
ARCHIVE_NAME = "webhook-emitter-oci.tar"
LAYOUT_DIR = "layout"
DEFAULT_REPOSITORY = "registry.example.com/rapidlogix/webhook-emitter"
WASMPLUGIN = REPO / "envoy" / "istio" / "wasmplugin.yaml"
WASMPLUGIN_OUT = "wasmplugin.yaml"

# Fixed metadata for every tar entry, so the bytes depend on the content only.
FIXED_MTIME = 0
FILE_MODE = 0o644
DIR_MODE = 0o755


def canonical_json(value) -> bytes:
    """Sorted keys, no insignificant whitespace: the same document always has the same digest."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def descriptor(media_type: str, data: bytes, annotations: dict | None = None) -> dict:
    d = {"mediaType": media_type, "digest": "sha256:" + sha256_hex(data), "size": len(data)}
    if annotations:
        d["annotations"] = annotations
    return d


def _tar_info(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.size = 0 if directory else size
    info.mode = DIR_MODE if directory else FILE_MODE
    info.mtime = FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def deterministic_tar(entries: list) -> bytes:
    """A ustar archive of (name, bytes or None for a directory), in the order given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in entries:
            if data is None:
                tar.addfile(_tar_info(name, directory=True))
            else:
                tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))
    return buf.getvalue()


def deterministic_gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    # No file name in the header (fileobj has none) and mtime 0: the output depends on the input only.
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def cargo_version() -> str:
    try:
        with open(REPO / "Cargo.toml", "rb") as f:
            return tomllib.load(f)["package"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "latest"


def build_image(wasm: bytes, tag: str) -> dict:
    """All blobs of the image, and its descriptors. Pure: the same input gives the same bytes."""
    if len(wasm) < 8 or wasm[:4] != b"\0asm":
        raise ValueError("not a WebAssembly module (no \\0asm magic number)")
    layer_tar = deterministic_tar([(WASM_NAME, wasm)])
    layer = deterministic_gzip(layer_tar)
    config = canonical_json({
        "architecture": "wasm",
        "os": "wasip1",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha256_hex(layer_tar)]},
        "history": [{"created_by": "envoy/oci/build_oci.py (webhook-emitter)", "comment": "plugin.wasm"}],
    })
    manifest = canonical_json({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": descriptor(MEDIA_CONFIG, config),
        "layers": [descriptor(MEDIA_LAYER, layer, {"org.opencontainers.image.title": WASM_NAME})],
        "annotations": {
            # Required by the compat variant when the layer is a standard OCI tar+gzip layer.
            "module.wasm.image/variant": "compat",
            "org.opencontainers.image.title": "webhook-emitter",
            "org.opencontainers.image.description": "Envoy proxy-wasm filter: job events to signed webhooks",
            "org.opencontainers.image.version": tag,
            "org.opencontainers.image.licenses": "Apache-2.0",
        },
    })
    index = canonical_json({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [descriptor(MEDIA_MANIFEST, manifest, {"org.opencontainers.image.ref.name": tag})],
    })
    blobs = {sha256_hex(b): b for b in (config, layer, manifest)}
    return {
        "blobs": blobs,
        "index": index,
        "oci_layout": canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}),
        "manifest_digest": "sha256:" + sha256_hex(manifest),
        "layer_digest": "sha256:" + sha256_hex(layer),
        "config_digest": "sha256:" + sha256_hex(config),
        "wasm_sha256": sha256_hex(wasm),
        "wasm_size": len(wasm),
    }


def layout_entries(image: dict) -> list:
    """The files of the OCI layout, sorted, as (relative path, bytes or None for a directory)."""
    entries = [
        ("blobs/", None),
        ("blobs/sha256/", None),
        *sorted((f"blobs/sha256/{digest}", data) for digest, data in image["blobs"].items()),
        ("index.json", image["index"]),
        ("oci-layout", image["oci_layout"]),
    ]
    return sorted(entries, key=lambda e: e[0])


def write_layout(image: dict, layout: Path) -> None:
    if layout.exists():
        # Only ever remove a directory this script made (or an empty one): never a path given by mistake.
        if not (layout / "oci-layout").is_file() and any(layout.iterdir()):
            raise SystemExit(f"{layout} exists and is not an OCI layout; refusing to replace it")
        shutil.rmtree(layout)
    for name, data in layout_entries(image):
        path = layout / name
        if data is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def filled_wasmplugin(template: str, ref: str, manifest_digest: str) -> str:
    """The shipped WasmPlugin with `url` and `sha256` set for this image; comments and layout kept. The shipped
    file's `sha256` is a placeholder the CRD refuses, so only a filled copy can be applied."""
    text, urls = re.subn(r"(?m)^(  url: )oci://\S+$", lambda m: f"{m.group(1)}oci://{ref}", template)
    text, digests = re.subn(r"(?m)^(  sha256: ).*$", lambda m: f'{m.group(1)}"{manifest_digest.split(":", 1)[1]}"',
                            text)
    if urls != 1 or digests != 1:
        raise ValueError(f"{WASMPLUGIN}: expected one `url: oci://…` and one `sha256:` line under spec")
    header = (f"# Written by `make oci` from {WASMPLUGIN.relative_to(REPO)}: `url` and `sha256` below are those of the\n"
              f"# image it built ({manifest_digest}). Apply this file after pushing the image.\n")
    return header + text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wasm", required=True, type=Path, help="the built webhook_emitter.wasm")
    parser.add_argument("--out", default=REPO / "target" / "oci", type=Path, help="output directory")
    parser.add_argument("--tag", default=None, help="image tag (default: the version in Cargo.toml)")
    parser.add_argument("--repository", default=None,
                        help="where you will push it (registry/path, no tag); with it, wasmplugin.yaml is written "
                             f"(default for the printed commands only: {DEFAULT_REPOSITORY})")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    args = parser.parse_args(argv)

    try:
        wasm = args.wasm.read_bytes()
    except OSError as e:
        print(f"build_oci: cannot read {args.wasm}: {e} (run `make wasm` first)", file=sys.stderr)
        return 1
    tag = args.tag or cargo_version()
    try:
        image = build_image(wasm, tag)
    except ValueError as e:
        print(f"build_oci: {args.wasm}: {e}", file=sys.stderr)
        return 1

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    layout = out / LAYOUT_DIR
    write_layout(image, layout)
    archive = out / ARCHIVE_NAME
    tmp = archive.with_name(archive.name + ".tmp")
    tmp.write_bytes(deterministic_tar(layout_entries(image)))
    os.replace(tmp, archive)

    ref = f"{args.repository or DEFAULT_REPOSITORY}:{tag}"
    wasmplugin = out / WASMPLUGIN_OUT
    try:
        if args.repository:
            wasmplugin.write_text(filled_wasmplugin(WASMPLUGIN.read_text(), ref, image["manifest_digest"]))
        else:
            wasmplugin.unlink(missing_ok=True)  # never leave one that names another build's image
    except (OSError, ValueError) as e:
        print(f"build_oci: {e}", file=sys.stderr)
        return 1

    summary = {
        "tag": tag,
        "wasmplugin": str(wasmplugin) if args.repository else None,
        "layout": str(layout),
        "archive": str(archive),
        "manifest_digest": image["manifest_digest"],
        "layer_digest": image["layer_digest"],
        "config_digest": image["config_digest"],
        "wasm_sha256": image["wasm_sha256"],
        "wasm_size": image["wasm_size"],
        "wasmplugin_sha256": image["manifest_digest"].split(":", 1)[1],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"""OCI image (Wasm compat variant, one layer holding {WASM_NAME}) for webhook-emitter {tag}
  layout:           {layout}
  archive:          {archive}
  manifest digest:  {image['manifest_digest']}
  layer digest:     {image['layer_digest']}
  wasm sha256:      {image['wasm_sha256']}  ({image['wasm_size']} bytes)

WasmPlugin for url: oci://{ref}
  sha256: {summary['wasmplugin_sha256']}
  (for oci:// Istio checks the manifest digest; the wasm sha256 above is for file:// or https:// urls)
  {f"written into {wasmplugin}: apply that file after the push" if args.repository else
   "run `make oci OCI_REPOSITORY=<registry>/<path>` to get it written into " + str(wasmplugin)}
  (envoy/istio/wasmplugin.yaml's placeholder is refused by the CRD)

Push it (any one of these; each keeps the manifest digest):
  skopeo copy --preserve-digests oci-archive:{archive}:{tag} docker://{ref}
  oras cp --from-oci-layout {layout}:{tag} {ref}
Then check the registry has the same digest:
  skopeo inspect docker://{ref} --format '{{{{.Digest}}}}'   # must print {image['manifest_digest']}""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
