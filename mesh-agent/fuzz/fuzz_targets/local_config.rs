//! The local-mode configuration files: YAML text into `local_config::build_from_texts` (parse
//! every document, merge the files, validate, build the model), then what the agent computes
//! from an accepted model. A NUL byte separates files (the first is the main file).
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use mesh_agent::local_config::build_from_texts;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let files: Vec<(String, String)> = text
        .split('\0')
        .enumerate()
        .map(|(i, t)| (format!("file{i}.yaml"), t.to_owned()))
        .collect();
    match build_from_texts(&files, None) {
        Ok(model) => common::use_model(&model),
        Err(errors) => {
            // Every error names what is wrong.
            let _ = errors.to_string();
        }
    }
});
