//! Helpers shared by the end-to-end tests.
//!
//! - [`fake_llm`]: a fake OpenAI-compatible chat-completions server for the prompt stage.

pub mod fake_llm;
