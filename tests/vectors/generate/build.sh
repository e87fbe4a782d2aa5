#!/bin/sh
# Regenerates tests/vectors/*.bson, *.json and manifest.json with Mono and
# Debian's Json.NET (apt-get install -y mono-mcs mono-runtime libnewtonsoft-json5.0-cil).
# Build products go to a temporary directory; nothing binary is left in the tree.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=$(cd "$here/.." && pwd)
json=${NEWTONSOFT_JSON:-$(dpkg -L libnewtonsoft-json5.0-cil | grep '/Newtonsoft.Json.dll$' | head -n 1)}
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
cp "$json" "$build/Newtonsoft.Json.dll"
mcs -nologo -target:library -out:"$build/Halibut.dll" -r:"$build/Newtonsoft.Json.dll" "$here/Halibut.cs"
mcs -nologo -target:library -out:"$build/Octopus.Tentacle.Contracts.dll" -r:"$build/Halibut.dll" "$here/Contracts.cs"
mcs -nologo -target:exe -out:"$build/Generate.exe" -r:"$build/Newtonsoft.Json.dll" -r:"$build/Halibut.dll" \
    -r:"$build/Octopus.Tentacle.Contracts.dll" "$here/Generate.cs" "$here/Failures.cs" "$here/Encryption.cs"
rm -f "$out"/*.bson "$out"/*.json
mono "$build/Generate.exe" "$out"
