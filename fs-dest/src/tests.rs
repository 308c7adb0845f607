//! Cross-module tests (filled below).
