//! ferryctl as a library: only its command-line definition, which `ferry-docgen` turns
//! into man pages and shell completions.
pub mod cli;
