//! `mnemo tokenizer`: tokenizer tools (train a byte-level BPE on a directory).

use anyhow::{bail, Result};
use clap::Subcommand;
use mnemo::config::CorpusSpec;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum TokenizerCmd {
    /// Train a byte-level BPE on a directory and save tokenizer.json.
    Train {
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// Vocabulary size (including the 256 byte tokens and <|endoftext|>).
        #[arg(long, default_value_t = 4096)]
        vocab: usize,
        #[arg(long, default_value = "tokenizer.json")]
        out: PathBuf,
        /// Use at most this many bytes of text.
        #[arg(long, default_value_t = 64 << 20)]
        max_bytes: u64,
        #[arg(long, value_name = "GLOB")]
        include: Vec<String>,
        #[arg(long, value_name = "GLOB")]
        exclude: Vec<String>,
    },
}

pub fn run(cmd: TokenizerCmd) -> Result<()> {
    match cmd {
        TokenizerCmd::Train {
            data,
            vocab,
            out,
            max_bytes,
            include,
            exclude,
        } => {
            let mut spec = CorpusSpec::new(&data);
            spec.include = include;
            spec.exclude = exclude;
            spec.val_fraction = 0.0;
            let corpus = mnemo::data::scan(&spec)?;
            if vocab < 257 {
                bail!("--vocab {vocab} is too small: a byte-level BPE needs at least 257 entries");
            }
            eprintln!(
                "training a byte-level BPE (vocab {vocab}) on {} files under {}",
                corpus.files.len(),
                data.display()
            );
            let tok = mnemo::tokenizer::Tokenizer::train(
                mnemo::data::texts(&corpus, mnemo::data::Split::Train, max_bytes),
                vocab,
            )?;
            tok.save(&out)?;
            println!("wrote {} ({} tokens)", out.display(), tok.vocab_size());
            Ok(())
        }
    }
}
