#!/usr/bin/env bash
# Mutation testing of the math core: every mutant mutmut makes of maspo.py and logprobs.py (one operator,
# constant or condition changed at a time) is run against tests/test_maspo.py and tests/test_logprobs.py;
# a mutant no test notices is "survived". The run happens in a scratch copy of those files, so the
# checkout is untouched. mutmut is an optional dev tool, not in the requirements files:
#     python -m pip install mutmut==3.8.1
#     bash bench/mutation.sh                   # ~30 min on 2 busy cores; MUTATION_DIR=dir: where the copy goes
#     cd $MUTATION_DIR && mutmut show NAME     # the diff of one surviving mutant
# Last result and the equivalent mutants: README.md, "Tests and benchmarks".
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${MUTATION_DIR:-$(mktemp -d -t maspo-mutation.XXXXXX)}
mkdir -p "$work/tests"
cp "$repo/maspo.py" "$repo/logprobs.py" "$work/"
cp "$repo/tests/conftest.py" "$repo/tests/test_maspo.py" "$repo/tests/test_logprobs.py" "$work/tests/"
cat > "$work/setup.cfg" <<'CFG'
[mutmut]
source_paths =
    maspo.py
    logprobs.py
pytest_add_cli_args_test_selection = tests/
process_isolation = forkserver
use_git_change_detection = false
CFG
cd "$work"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per mutant worker: --max-children workers share the cores
echo "mutation run in $work"
mutmut run --max-children "${MUTATION_JOBS:-2}" || true
mutmut results --all true > results.txt || mutmut results > results.txt
for f in maspo logprobs; do  # per file: mutants generated, and how each ended
    echo "$f.py: $(grep -c "^ *$f\." results.txt || true) listed; $(grep "^ *$f\." results.txt | awk '{print $NF}' | sort | uniq -c | tr '\n' ' ')"
done
