"""Generate image -> text pairs of the kinds the design names for vision_text, offline, as webdataset tar shards.

The command over data/corpus/vision_pairs.py: `python tools/make_vision_pairs.py --help`."""

from cromwell.data.corpus.vision_pairs import main

if __name__ == "__main__":
    main()
