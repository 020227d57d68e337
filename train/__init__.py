"""medswav trainer: SwAV swapped prediction with per-modality prototypes, queue, prototype freezing and
an optional supervised term; one process or many under torchrun (`python -m train --help`)."""
