#!/bin/bash
# Submit the curriculum's stages as Slurm jobs: each starts when its predecessor has succeeded
# (--dependency=afterok; a requeued predecessor is waited for until it finishes) and from its final
# checkpoint. The stages, their configs, token budgets and overrides come from the curriculum file,
# the same one `pretrain/curriculum.py` runs in a single job.
#
#   bash slurm/submit_curriculum.sh [--curriculum pretrain/configs/curriculum.yaml] [--set KEY=VALUE ...] \
#        [-- SBATCH_OPTION ...]
#
# Options after `--` go to every sbatch (e.g. `-- --nodes=8 --partition=gpu`). Prints the job ids.

set -euo pipefail
cd "$(dirname "$0")/.."
curriculum=pretrain/configs/curriculum.yaml
sets=()
sbatch_options=()
while (( $# )); do
    case $1 in
        --curriculum) curriculum=$2; shift 2 ;;
        --set) sets+=(--set "$2"); shift 2 ;;
        --) shift; sbatch_options=("$@"); break ;;
        *) echo "error: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=python3
    [[ -x .venv/bin/python ]] && PYTHON=$PWD/.venv/bin/python
fi

stages=$("$PYTHON" -m cromwell.pretrain.curriculum --curriculum "$curriculum" "${sets[@]}" --stages 2>/dev/null | grep $'^STAGE\t') \
    || { "$PYTHON" -m cromwell.pretrain.curriculum --curriculum "$curriculum" "${sets[@]}" --stages >/dev/null; exit 1; }

dependency=()
while IFS=$'\t' read -r -a fields; do
    name=${fields[1]} config=${fields[2]}
    script=slurm/$name.sh
    if [[ ! -f $script ]]; then
        echo "error: $curriculum: stage $name has no job script $script" >&2
        exit 1
    fi
    args=()
    run_dir=
    for s in "${fields[@]:3}"; do
        args+=(--set "$s")
        [[ $s == run.output_dir=* ]] && run_dir=${s#run.output_dir=}
    done
    job=$(CONFIG=$config RUN_DIR=$run_dir sbatch --parsable "${dependency[@]}" "${sbatch_options[@]}" "$script" "${args[@]}")
    job=${job%%;*}
    echo "$name: job $job (run dir $run_dir)"
    dependency=(--dependency="afterok:$job" --kill-on-invalid-dep=yes)
done <<< "$stages"
