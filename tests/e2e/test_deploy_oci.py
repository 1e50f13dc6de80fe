"""envoy/oci/build_oci.py: the built .wasm as an OCI image in the format Istio's agent accepts (the Wasm image
"compat" variant: one tar+gzip layer holding plugin.wasm), as an OCI layout and as an archive of it.

Checked here: every digest and size from index.json down to the blobs, the layer's content (exactly plugin.wasm,
byte-identical to the build), reproducibility, and, when Debian's skopeo is installed, that skopeo reads both
the archive and the layout and copies the image without changing its digest (what pushing it does)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import harness

SCRIPT = harness.REPO / "envoy" / "oci" / "build_oci.py"
ARCHIVE = "webhook-emitter-oci.tar"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = "application/vnd.oci.image.config.v1+json"
TAG = "9.9.9-test"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build(wasm: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--wasm", str(wasm), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def image(wasm, tmp_path_factory):
    out = tmp_path_factory.mktemp("oci")
    proc = build(wasm, out, "--tag", TAG, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    return {"out": out, "layout": out / "layout", "archive": out / ARCHIVE, "summary": summary}


def blob(layout: Path, digest: str) -> bytes:
    algo, hexdigest = digest.split(":", 1)
    assert algo == "sha256"
    return (layout / "blobs" / "sha256" / hexdigest).read_bytes()


def verified(layout: Path, desc: dict) -> bytes:
    """The blob a descriptor points at, after checking its digest and size."""
    data = blob(layout, desc["digest"])
    assert sha256(data) == desc["digest"], f"blob {desc['digest']} does not hash to its name"
    assert len(data) == desc["size"], f"blob {desc['digest']}: size {len(data)}, descriptor says {desc['size']}"
    return data


def walk(layout: Path) -> dict:
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert index["schemaVersion"] == 2
    assert len(index["manifests"]) == 1
    mdesc = index["manifests"][0]
    assert mdesc["mediaType"] == MANIFEST
    manifest_bytes = verified(layout, mdesc)
    manifest = json.loads(manifest_bytes)
    assert manifest["schemaVersion"] == 2 and manifest["mediaType"] == MANIFEST
    assert manifest["config"]["mediaType"] == CONFIG
    config = json.loads(verified(layout, manifest["config"]))
    assert len(manifest["layers"]) == 1, "the compat variant has exactly one layer"
    ldesc = manifest["layers"][0]
    assert ldesc["mediaType"] == LAYER
    layer = verified(layout, ldesc)
    return {"index": index, "mdesc": mdesc, "manifest": manifest, "manifest_digest": mdesc["digest"],
            "config": config, "ldesc": ldesc, "layer": layer}


def test_digest_chain_index_manifest_config_layer(image):
    w = walk(image["layout"])
    s = image["summary"]
    assert s["manifest_digest"] == w["manifest_digest"]
    assert s["layer_digest"] == w["ldesc"]["digest"]
    assert s["config_digest"] == w["manifest"]["config"]["digest"]
    # Istio compares WasmPlugin.sha256 with the manifest digest for oci:// urls.
    assert s["wasmplugin_sha256"] == w["manifest_digest"].removeprefix("sha256:")
    assert w["mdesc"]["annotations"]["org.opencontainers.image.ref.name"] == TAG
    assert w["manifest"]["annotations"]["module.wasm.image/variant"] == "compat"
    # No stray blobs: exactly manifest, config and layer.
    names = {p.name for p in (image["layout"] / "blobs" / "sha256").iterdir()}
    assert names == {d.removeprefix("sha256:") for d in (s["manifest_digest"], s["layer_digest"], s["config_digest"])}


def test_layer_holds_exactly_plugin_wasm(image, wasm):
    w = walk(image["layout"])
    # Deterministic gzip header (RFC 1952): no FNAME/FCOMMENT/FEXTRA flags, MTIME 0. Two builds in the same second
    # would not show a header with the build time in it, so look at the bytes.
    assert w["layer"][:3] == b"\x1f\x8b\x08"
    assert w["layer"][3] == 0, "gzip header flags set (a file name or comment makes the digest depend on it)"
    assert w["layer"][4:8] == b"\0\0\0\0", "gzip header MTIME is not 0: the digest would change with the clock"
    raw = gzip.decompress(w["layer"])
    assert w["config"]["rootfs"] == {"type": "layers", "diff_ids": [sha256(raw)]}
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["plugin.wasm"]
        assert members[0].isfile()
        content = tar.extractfile(members[0]).read()
    built = wasm.read_bytes()
    assert content == built, "plugin.wasm in the layer differs from the built module"
    assert image["summary"]["wasm_sha256"] == hashlib.sha256(built).hexdigest()
    assert image["summary"]["wasm_size"] == len(built)


def test_archive_holds_the_same_layout(image):
    layout = image["layout"]
    on_disk = {str(p.relative_to(layout)): p.read_bytes() for p in layout.rglob("*") if p.is_file()}
    with tarfile.open(image["archive"]) as tar:
        in_tar = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in tar.getmembers())
    assert in_tar == on_disk
    assert "oci-layout" in in_tar and "index.json" in in_tar


def test_build_is_reproducible(image, wasm, tmp_path):
    again = build(wasm, tmp_path, "--tag", TAG, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["manifest_digest"] == image["summary"]["manifest_digest"]
    assert (tmp_path / ARCHIVE).read_bytes() == image["archive"].read_bytes()
    # Rebuilding into the same place replaces the layout instead of piling up blobs.
    third = build(wasm, tmp_path, "--tag", "other", "--json")
    assert third.returncode == 0, third.stderr
    assert json.loads(third.stdout)["manifest_digest"] != image["summary"]["manifest_digest"], "the tag is in the manifest"
    walk(tmp_path / "layout")
    assert len(list((tmp_path / "layout" / "blobs" / "sha256").iterdir())) == 3


def test_text_output_tells_what_the_wasmplugin_needs_and_how_to_push(wasm, tmp_path, image):
    proc = build(wasm, tmp_path, "--tag", TAG)
    assert proc.returncode == 0, proc.stderr
    digest = image["summary"]["manifest_digest"]
    assert f"manifest digest:  {digest}" in proc.stdout
    assert f"sha256: {digest.removeprefix('sha256:')}" in proc.stdout
    assert "skopeo copy --preserve-digests oci-archive:" in proc.stdout


def test_refuses_what_is_not_a_wasm_module_or_not_its_own_output(tmp_path):
    bogus = tmp_path / "bogus.wasm"
    bogus.write_bytes(b"not wasm at all")
    proc = build(bogus, tmp_path / "out")
    assert proc.returncode != 0 and "not a WebAssembly module" in proc.stderr
    precious = tmp_path / "precious" / "layout"
    precious.mkdir(parents=True)
    (precious / "keep.txt").write_text("mine")
    wasm_ok = tmp_path / "ok.wasm"
    wasm_ok.write_bytes(b"\0asm\x01\0\0\0")
    proc = build(wasm_ok, tmp_path / "precious")
    assert proc.returncode != 0 and "refusing" in proc.stderr
    assert (precious / "keep.txt").read_text() == "mine"


SKOPEO = shutil.which("skopeo")


@pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed (apt-get install -y skopeo); the OCI checks "
                    "above still ran, only the check with a third-party OCI tool is skipped")
def test_skopeo_reads_and_copies_the_image_without_changing_its_digest(image, tmp_path):
    s = image["summary"]
    for ref in (f"oci-archive:{image['archive']}", f"oci-archive:{image['archive']}:{TAG}",
                f"oci:{image['layout']}:{TAG}"):
        proc = subprocess.run([SKOPEO, "inspect", ref], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"skopeo inspect {ref}: {proc.stderr}"
        info = json.loads(proc.stdout)
        assert info["Digest"] == s["manifest_digest"], ref
        assert info["Layers"] == [s["layer_digest"]], ref
        raw = subprocess.run([SKOPEO, "inspect", "--raw", ref], capture_output=True, timeout=60, check=True).stdout
        assert sha256(raw) == s["manifest_digest"]
    # What a push does, into a local layout instead of a registry: the digest must survive the copy.
    dest = tmp_path / "copied"
    proc = subprocess.run([SKOPEO, "copy", "--quiet", "--preserve-digests", f"oci-archive:{image['archive']}:{TAG}",
                           f"oci:{dest}:{TAG}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    copied = walk(dest)
    assert copied["manifest_digest"] == s["manifest_digest"]
    assert copied["ldesc"]["digest"] == s["layer_digest"]
