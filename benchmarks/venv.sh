# Sourced by benchmarks/run: create or refresh .venv-bench with stepsafe (editable, with its
# s3 and gcs extras) and the requirement files, only when one of them or the project's metadata
# changed. Sets $venv and cds to the repository root.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
reqs=("$here/requirements.txt" "$here/requirements-buckets.txt")
extras="s3,gcs"
venv="$root/.venv-bench"
stamp="$venv/.bench-installed-$extras"
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
want="$(cat "${reqs[@]}" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    # (the filters hide the local mirror's harmless "Location ... is ignored" warnings)
    "$venv/bin/python" -m pip install --quiet --upgrade pip 2> >(grep -v "is ignored: it is neither" >&2)
    "$venv/bin/python" -m pip install --quiet -e "$root[$extras]" \
        $(printf -- '-r %s ' "${reqs[@]}") 2> >(grep -v "is ignored: it is neither" >&2)
    echo "$want" >"$stamp"
fi
cd "$root"
