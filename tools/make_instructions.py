"""Instruction-tuning chats for the curriculum's stage 4 (code editing tasks, multimodal QA; docs/design.md,
The curriculum), made offline from what every machine has.

The command over data/corpus/instructions.py: `python tools/make_instructions.py --help`."""

from cromwell.data.corpus.instructions import main

if __name__ == "__main__":
    main()
