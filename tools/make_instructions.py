"""Instruction-tuning chats for the curriculum's stage 4 (seed 2.1: code editing tasks, multimodal QA),

The command over data/corpus/instructions.py: `python tools/make_instructions.py --help`."""

from cromwell.data.corpus.instructions import main

if __name__ == "__main__":
    main()
