#!/usr/bin/env bash
# Fetch the ONNX Runtime C/C++ headers from Debian trixie's libonnxruntime-dev package
# (or, with --json, nlohmann/json's single header from Debian trixie's nlohmann-json3-dev,
# which the C++ sample in samples/cpp/ uses to read lrexport.json).
#
# The onnxruntime wheels on PyPI ship no headers. Debian 13 (trixie) packages ORT 1.21
# (C API version 21); a custom-op library built against those headers and initialised
# with ORT_API_MANUAL_INIT loads in newer runtimes too (see docs/custom_op.md).
#
# The package is downloaded with apt WITHOUT touching the system's apt state: a private
# sources list for the `trixie` suite is written from the mirror URI(s) and Signed-By
# keyring read at run time from /etc/apt/sources.list.d/debian.sources, and apt's lists and
# cache directories point into the build folder. Nothing is installed; the .deb is unpacked
# with `dpkg-deb -x`.
#
# Usage: fetch_ort_headers.sh [DEST]          ONNX Runtime (DEST defaults to <repo>/build/ort-headers)
#        fetch_ort_headers.sh --json [DEST]   nlohmann/json (DEST defaults to <repo>/build/json-headers)
# Prints the include directory (the one holding onnxruntime_c_api.h, or the one holding
# nlohmann/json.hpp) on stdout; progress and errors go to stderr. Idempotent: does nothing but
# print when the headers are already there.
# Environment: LREXPORT_DEBIAN_SOURCES overrides the deb822 file read for the mirror.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# What to fetch: the package(s), the header that marks the include directory (a path relative
# to it), other headers that must sit beside it, how to name the headers and how to bypass us.
what="ONNX Runtime"
packages=(libonnxruntime-dev)
header=onnxruntime_c_api.h
also=(onnxruntime_cxx_api.h)
deps_pattern='onnxruntime.*(dev|headers|include)'  # dependencies that may hold split-out headers
bypass="pass -DORT_INCLUDE_DIR=/path/to/onnxruntime/include to CMake (or set ORT_INCLUDE_DIR)"
default_dest="$here/../build/ort-headers"
if [ "${1:-}" = "--json" ]; then
    shift
    what="nlohmann/json"
    packages=(nlohmann-json3-dev)
    header=nlohmann/json.hpp
    also=()
    deps_pattern=''
    bypass="pass -DJSON_INCLUDE_DIR=/path/to/include (the folder holding nlohmann/json.hpp) to CMake \
(or set JSON_INCLUDE_DIR)"
    default_dest="$here/../build/json-headers"
fi
case "${1:-}" in -*) echo "usage: $0 [--json] [DEST]" >&2; exit 2 ;; esac
dest="${1:-$default_dest}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
sources_file="${LREXPORT_DEBIAN_SOURCES:-/etc/apt/sources.list.d/debian.sources}"
suite=trixie

say() { echo "fetch_ort_headers: $*" >&2; }
die() { echo "fetch_ort_headers: error: $*" >&2; exit 1; }

find_include() {
    local h inc a
    h="$(find "$dest/root" -path "*/$header" -print -quit 2>/dev/null || true)"
    [ -n "$h" ] || return 1
    inc="${h%/"$header"}"
    for a in ${also[@]+"${also[@]}"}; do
        [ -f "$inc/$a" ] || return 1
    done
    echo "$inc"
}

if inc="$(find_include)"; then
    say "$what headers already fetched"
    echo "$inc"
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found: this script needs a Debian-like system with apt. \
Otherwise $bypass."
done
[ -r "$sources_file" ] || die "cannot read $sources_file (deb822 apt sources with the Debian mirror). \
Instead, $bypass."

# Mirror URIs and keyring of the stanzas that serve the main archive: those with a plain
# suite name (bookworm, trixie...), not only -security / -updates suites.
mirror="$(awk '
    function flush() {
        if (deb && uris != "" && plain) print uris "\t" (signed == "" ? "-" : signed)
        uris = ""; signed = ""; plain = 0; deb = 1
    }
    BEGIN { deb = 1 }
    /^[[:space:]]*#/ { next }
    /^[[:space:]]*$/ { flush(); next }
    { key = tolower($1); $1 = ""; sub(/^[[:space:]]+/, ""); sub(/[[:space:]]+$/, "") }
    key == "types:"     { deb = (" " $0 " " ~ / deb /) }
    key == "uris:"      { uris = $0 }
    key == "signed-by:" { signed = $0 }
    key == "suites:"    { n = split($0, s, /[[:space:]]+/); for (i = 1; i <= n; i++) if (s[i] !~ /-/) plain = 1 }
    END { flush() }
' "$sources_file" | head -n 1 || true)"
[ -n "$mirror" ] || die "no Debian archive stanza (Types: deb, URIs:, a plain Suites: entry) in $sources_file"
uris="${mirror%%$'\t'*}"
keyring="${mirror#*$'\t'}"

work="$dest/apt"
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"
{
    echo "Types: deb"
    echo "URIs: $uris"
    echo "Suites: $suite"
    echo "Components: main"
    if [ "$keyring" != "-" ]; then echo "Signed-By: $keyring"; fi
} > "$work/trixie.sources"
# A private config read after the system's: drop the update hooks of the host (appstream,
# packagekit...) so that our private update changes nothing outside $work.
cat > "$work/apt.conf" <<'EOF'
#clear APT::Update::Pre-Invoke;
#clear APT::Update::Post-Invoke;
#clear APT::Update::Post-Invoke-Success;
#clear DPkg::Pre-Invoke;
#clear DPkg::Post-Invoke;
Acquire::Languages "none";
EOF
# apt drops to the _apt user for downloads when root; let it write into our private folders.
if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then
    chown -R _apt "$work/lists/partial" "$work/cache/archives/partial" "$work/debs" 2>/dev/null || true
fi

apt_opts=(
    -c "$work/apt.conf"
    -o "Dir::Etc::SourceList=$work/trixie.sources"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::Etc::Preferences=/dev/null"
    -o "Dir::Etc::PreferencesParts=/dev/null"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::Cache=$work/cache"
)

say "apt-get update of the private '$suite' list ($uris)"
# apt-get update exits 0 when an index cannot be downloaded (it only warns): check the log too
if ! apt-get "${apt_opts[@]}" -q update >"$work/update.log" 2>&1 \
        || grep -qE '^(E:|W: Failed to fetch|Err:)' "$work/update.log"; then
    grep -E '^(E:|W:|Err:)' "$work/update.log" >&2 || cat "$work/update.log" >&2
    die "apt-get update of the '$suite' suite failed: apt cannot reach the Debian mirror ($uris). \
Check the network, or $bypass."
fi
if grep -qE '^W:' "$work/update.log"; then
    grep -E '^W:' "$work/update.log" >&2
fi
if ! apt-cache "${apt_opts[@]}" show "${packages[0]}" >"$work/show.txt" 2>&1; then
    cat "$work/show.txt" >&2
    die "package '${packages[0]}' not found in the '$suite' suite of $uris (apt could not fetch the index?)"
fi
say "$(grep -m1 '^Version:' "$work/show.txt" | sed "s/^/${packages[0]} /")"

# The headers may be split into another package: follow the -dev package's dependencies
# on *onnxruntime*-dev / *-headers packages.
if [ -n "$deps_pattern" ]; then
    extra="$(awk -F': ' '/^Depends:/ { print $2; exit }' "$work/show.txt" | tr ',' '\n' \
             | sed 's/[(|].*//; s/[[:space:]]//g' | grep -E "$deps_pattern" || true)"
    for p in $extra; do packages+=("$p"); done
fi

(
    cd "$work/debs"
    apt-get "${apt_opts[@]}" -q download "${packages[@]}" >&2
) || die "apt-get download ${packages[*]} failed (see above)"

rm -rf "$dest/root"
mkdir -p "$dest/root"
for deb in "$work"/debs/*.deb; do
    say "unpacking $(basename "$deb")"
    dpkg-deb -x "$deb" "$dest/root"
done
inc="$(find_include)" || die "no $header ${also[*]+${also[*]} }in ${packages[*]} \
(list the package with 'dpkg-deb -c'); $bypass instead"
rm -rf "$work/lists" "$work/cache"  # the private apt indexes (~10 MB) are not needed any more
say "$what headers in $inc"
echo "$inc"
