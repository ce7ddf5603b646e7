#!/bin/sh
# The offline bundle for hospitals whose network reaches neither the package index nor a container
# registry (deploy/ONBOARDING.md, "Installing without a network"). Run at the lab, from the
# repository root, on a machine that can reach the package index:
#
#   deploy/offline.sh lock              re-make deploy/requirements.lock: every runtime dependency pinned
#                                       with its sha256 hashes (the versions already there are kept;
#                                       add --upgrade-package NAME to move one). Needs uv (pip install uv).
#   deploy/offline.sh wheelhouse [DIR]  DIR (default dist/mrsfm-offline-VERSION): every locked wheel
#                                       (hash-checked as it is downloaded), the mrsfm wheel, the lock,
#                                       the kit (configs/, deploy/), RELEASE and SHA256SUMS; then DIR.tar.
#                                       Run it with the sites' Python (3.11) on Linux x86_64, as the sites.
#   deploy/offline.sh image [FILE]      the container image, built from the lock, saved with docker save
#                                       (default dist/mrsfm-VERSION-image.tar.gz) with its sha256.
#
# A site installs the wheelhouse with no network at all:
#   pip install --no-index --find-links wheelhouse --require-hashes -r requirements.lock
#   pip install --no-index --no-deps wheelhouse/mrsfm-VERSION-py3-none-any.whl
set -eu

PYTHON=${PYTHON:-python3.11}
LOCK=deploy/requirements.lock
# the interpreter and platform the lock is made for: the image's python:3.11 and the sites' Linux x86_64
LOCK_PYTHON=3.11.7
LOCK_PLATFORM=x86_64-manylinux_2_28

[ -f pyproject.toml ] && [ -f "$LOCK" ] || { echo "offline.sh: run it from the repository root" >&2; exit 2; }
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

case "${1:-}" in
lock)
    shift
    uv pip compile pyproject.toml --generate-hashes --no-config --index-url https://pypi.org/simple \
        --python-version "$LOCK_PYTHON" --python-platform "$LOCK_PLATFORM" \
        --custom-compile-command "deploy/offline.sh lock" -o "$LOCK" "$@"
    ;;
wheelhouse)
    OUT=${2:-dist/mrsfm-offline-$VERSION}
    "$PYTHON" -c 'import platform, sys; assert sys.version_info[:2] == (3, 11) and platform.machine() == "x86_64" and sys.platform == "linux", "needs Python 3.11 on Linux x86_64, as the sites run"'
    mkdir -p "$OUT/wheelhouse"
    # every locked file, each checked against the lock's hashes as it lands
    "$PYTHON" -m pip download --no-deps --require-hashes -r "$LOCK" -d "$OUT/wheelhouse"
    # what pip needs to build the one locked package published only as source (antlr4-python3-runtime) offline
    "$PYTHON" -m pip download --no-deps -d "$OUT/wheelhouse" setuptools wheel
    "$PYTHON" -m pip wheel --no-deps -w "$OUT/wheelhouse" .
    cp "$LOCK" "$OUT/requirements.lock"
    git archive --format=tar.gz -o "$OUT/kit.tar.gz" HEAD configs deploy
    echo "mrsfm $VERSION, commit $(git rev-parse --short=12 HEAD)" > "$OUT/RELEASE"
    (cd "$OUT" && find . -type f ! -name SHA256SUMS | sort | xargs sha256sum > SHA256SUMS)
    tar -cf "$OUT.tar" -C "$(dirname "$OUT")" "$(basename "$OUT")"
    echo "offline bundle: $OUT.tar ($(du -sh "$OUT.tar" | cut -f1)); check at the site with: sha256sum -c SHA256SUMS"
    ;;
image)
    FILE=${2:-dist/mrsfm-$VERSION-image.tar.gz}
    mkdir -p "$(dirname "$FILE")"
    docker build -f deploy/Dockerfile -t "mrsfm:$VERSION" .
    docker save "mrsfm:$VERSION" | gzip > "$FILE"
    sha256sum "$FILE" > "$FILE.sha256"
    echo "image mrsfm:$VERSION ($(docker image inspect --format '{{.Id}}' "mrsfm:$VERSION")) saved to $FILE"
    ;;
*)
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
