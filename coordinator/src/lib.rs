//! The syncd coordinator library.
