//! ferry-image: the memory image format (in progress).
