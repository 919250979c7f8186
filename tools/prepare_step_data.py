"""Turn reasoning jsonl records into Step-JEPA chat records (docs/design.md, Step-JEPA fine-tuning).

The command over data/corpus/step_data.py: `python tools/prepare_step_data.py --help`."""

from cromwell.data.corpus.step_data import main

if __name__ == "__main__":
    main()
