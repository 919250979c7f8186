"""Write a jsonl corpus from this machine's Python standard library: the embedded default data.

The command over data/corpus/stdlib.py: `python tools/stdlib_corpus.py --help`."""

from cromwell.data.corpus.stdlib import main

if __name__ == "__main__":
    main()
