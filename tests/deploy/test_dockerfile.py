"""The Dockerfile, checked without a container engine.

The build stage is replayed in a scratch directory standing for the image's
root: exactly what each COPY names is laid out there (minus what
.dockerignore leaves out of the build context), and each RUN runs there, so
a file the build needs but no COPY brings fails here as it would in
`docker build`. The build stage's image is Debian bookworm with Rust, as this
machine is. The runtime stage's binary must need nothing beyond what
debian:bookworm-slim provides (glibc 2.36, libgcc_s, zlib; ca-certificates
is installed by the stage itself).

The stage's `target` directory is kept in target/dockerfile-check between
runs, so only the first run builds the dependencies.
"""

import fnmatch
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path

import dockerfile
import pytest

ROOT = Path(__file__).resolve().parents[2]
KEPT_TARGET = ROOT / "target" / "dockerfile-check"
# What debian:bookworm-slim has: the C library's parts, libgcc_s, and zlib
# (librdkafka's compression; dpkg pre-depends on zlib1g, so every Debian
# image has it). OpenSSL and librdkafka are linked in statically.
RUNTIME_LIBRARIES = {
    "linux-vdso.so.1", "libc.so.6", "libm.so.6", "libgcc_s.so.1", "libpthread.so.0",
    "libdl.so.2", "librt.so.1", "ld-linux-x86-64.so.2", "libz.so.1",
}
BOOKWORM_GLIBC = (2, 36)


def stages():
    """The Dockerfile's stages: [(image, name, instructions)]."""
    out = []
    for c in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if c.cmd == "FROM":
            name = c.value[2] if len(c.value) == 3 and c.value[1].upper() == "AS" else None
            out.append((c.value[0], name, []))
        else:
            out[-1][2].append(c)
    return out


def dockerignore():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [l.strip().rstrip("/") for l in lines if l.strip() and not l.startswith("#")]


def ignored(rel, patterns):
    parts = Path(rel).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns)


def copy_from_context(src, dest, patterns):
    """COPY src dest: a file to dest (into it when it is a directory), a
    directory's contents into dest; what .dockerignore names is not in the
    context."""
    source = ROOT / src
    assert source.exists(), f"COPY {src}: not in the build context"
    assert not ignored(src, patterns), f"COPY {src}: left out by .dockerignore"
    if source.is_file():
        target = dest / source.name if dest.is_dir() else dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        return
    for path in source.rglob("*"):
        rel = path.relative_to(ROOT)
        if path.is_file() and not ignored(str(rel), patterns):
            target = dest / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def replay_build_stage(root, instructions):
    """Runs the build stage in `root` (standing for /); returns the env."""
    patterns = dockerignore()
    workdir = root
    env = {**os.environ, "CARGO_TERM_COLOR": "never"}
    for c in instructions:
        if c.cmd == "WORKDIR":
            workdir = root / c.value[0].lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
            KEPT_TARGET.mkdir(parents=True, exist_ok=True)
            (workdir / "target").symlink_to(KEPT_TARGET, target_is_directory=True)
        elif c.cmd == "COPY":
            assert not c.flags, f"line {c.start_line}: COPY flags are not replayed here"
            *sources, dest = c.value
            target = workdir / dest
            if dest.endswith("/") or len(sources) > 1:
                target.mkdir(parents=True, exist_ok=True)
            for src in sources:
                copy_from_context(src, target, patterns)
        elif c.cmd == "RUN":
            done = subprocess.run(["sh", "-c", c.value[0]], cwd=workdir, env=env,
                                  capture_output=True, text=True)
            assert done.returncode == 0, (
                f"line {c.start_line}: RUN failed ({done.returncode}):\n{c.value[0]}\n"
                f"{done.stderr[-4000:]}")
        elif c.cmd == "ENV":
            env.update(dict(zip(c.value[::2], c.value[1::2])))
        else:
            pytest.fail(f"line {c.start_line}: {c.cmd} in the build stage is not replayed here")
    return env


def needed_libraries(binary):
    out = subprocess.run(["ldd", str(binary)], check=True, capture_output=True, text=True).stdout
    libs = {}
    for line in out.splitlines():
        name = line.split()[0]
        libs[Path(name).name] = "not found" not in line
    return libs


def newest_glibc(binary):
    out = subprocess.run(["objdump", "-T", str(binary)], check=True, capture_output=True,
                         text=True).stdout
    versions = {tuple(int(x) for x in v.split(".")) for v in re.findall(r"GLIBC_(\d+(?:\.\d+)+)", out)}
    return max(versions)


def test_the_image_builds_from_what_it_copies_and_runs_on_its_base():
    (build_image, build_name, build), (runtime_image, _, runtime) = stages()
    assert build_image.startswith("rust:") and build_image.endswith("-bookworm")
    assert runtime_image == "debian:bookworm-slim", "the libraries checked below are bookworm's"
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        replay_build_stage(root, build)

        (copy,) = [c for c in runtime if c.cmd == "COPY"]
        assert copy.flags == (f"--from={build_name}",)
        source, dest = copy.value
        binary = root / source.lstrip("/")
        assert binary.is_file(), f"the build stage made no {source}"
        libs = needed_libraries(binary)
        missing = [l for l, found in libs.items() if not found]
        assert not missing, f"not found: {missing}"
        extra = set(libs) - RUNTIME_LIBRARIES
        assert not extra, f"needs libraries debian:bookworm-slim does not have: {extra}"
        assert newest_glibc(binary) <= BOOKWORM_GLIBC

        version = subprocess.run([str(binary), "--version"], check=True, capture_output=True,
                                 text=True).stdout
        assert version.startswith("uincall-enricher ")

    by_cmd = {}
    for c in runtime:
        by_cmd.setdefault(c.cmd, []).append(c)
    (entry,) = by_cmd["ENTRYPOINT"]
    assert entry.value == (dest,), "the entrypoint is the copied binary"
    (user,) = by_cmd["USER"]
    uid = user.value[0].split(":")[0]
    assert uid.isdigit() and uid != "0", "a numeric non-root user (runAsNonRoot can check it)"
    installs = " ".join(c.value[0] for c in by_cmd["RUN"])
    assert "ca-certificates" in installs and f"--uid {uid}" in installs
    (expose,) = by_cmd["EXPOSE"]
    assert expose.value == ("9464",), "the side port's default"


def test_the_image_carries_oci_labels():
    (_, _, runtime) = stages()[-1]
    labels = {}
    args = {}
    for c in runtime:
        if c.cmd == "LABEL":
            values = [v.strip('"') for v in c.value]
            labels.update(dict(zip(values[::2], values[1::2])))
        elif c.cmd == "ARG":
            name, _, default = c.value[0].partition("=")
            args[name] = default.strip('"')
            assert not labels, f"ARG {name} after a LABEL: not expanded in it"
    for key in ("title", "description", "version", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.base.name"].endswith("debian:bookworm-slim")
    # Set by the build (--build-arg), from build arguments of this stage:
    # the version has a default, the commit and the source URL none (the
    # label is then empty, which the OCI annotation rules allow).
    for key, arg in (("version", "VERSION"), ("revision", "REVISION"), ("source", "SOURCE")):
        assert labels[f"org.opencontainers.image.{key}"] == f"${{{arg}}}", key
        assert arg in args, f"ARG {arg} is not declared in the runtime stage"
    assert args["REVISION"] == args["SOURCE"] == ""
    # A licenses label only with a licence Cargo.toml declares, and the same.
    package = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]
    assert labels.get("org.opencontainers.image.licenses") == package.get("license")
