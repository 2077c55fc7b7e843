//! Fitting a token budget: whole files in rank order while they fit, then signature-only
//! summaries of the rest, then the exact check of the whole document.

use crate::check::TextFile;
use crate::lang::signatures;
use crate::rank::rank;
use crate::render::render_files;
use crate::types::{Cut, Mode, PackedFile};
use anyhow::Result;
use mnemo::tokenizer::Tokenizer;
use rayon::prelude::*;

/// Tokens a section of `f` adds to the document (header, content, separators); exact up to
/// merges across section boundaries, which [`fit_budget`] checks afterwards.
fn section_cost(f: &PackedFile, tok: &Tokenizer) -> Result<usize> {
    let header = tok.encode(&(f.header() + "\n"))?.len();
    let newline = usize::from(!f.content.is_empty() && !f.content.ends_with('\n'));
    Ok(header + f.tokens.unwrap_or(0) + newline + 1)
}

pub(crate) fn fit_budget(
    texts: Vec<TextFile>,
    budget: usize,
    query: Option<&str>,
    tok: &Tokenizer,
) -> Result<(Vec<PackedFile>, Cut)> {
    let order = rank(&texts, query);
    let names: Vec<String> = texts.iter().map(|t| t.rel.clone()).collect();
    let mut rank_of = vec![0; texts.len()];
    for (r, &i) in order.iter().enumerate() {
        rank_of[i] = r;
    }
    let mut sigs: Vec<Option<PackedFile>> = texts.iter().map(|_| None).collect();
    let mut whole: Vec<Option<PackedFile>> = texts.into_iter().map(|t| Some(t.whole())).collect();
    let whole_cost: Vec<usize> = whole
        .par_iter()
        .map(|f| section_cost(f.as_ref().expect("present"), tok))
        .collect::<Result<_>>()?;

    // Pass 1: whole files in rank order, each one that fits.
    let mut chosen: Vec<Option<Mode>> = vec![None; whole.len()];
    let mut left = budget;
    for &i in &order {
        if whole_cost[i] <= left {
            chosen[i] = Some(Mode::Whole);
            left -= whole_cost[i];
        }
    }

    // Pass 2: signatures of the rest, in rank order, while they fit.
    let rest: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&i| chosen[i].is_none())
        .collect();
    let summaries: Vec<Option<(PackedFile, usize)>> = rest
        .par_iter()
        .map(|&i| -> Result<Option<(PackedFile, usize)>> {
            let f = whole[i].as_ref().expect("present");
            let content = signatures(&f.content, f.language);
            if content.is_empty() {
                return Ok(None);
            }
            let s = PackedFile {
                path: f.path.clone(),
                language: f.language,
                bytes: f.bytes,
                file_tokens: f.file_tokens,
                tokens: Some(tok.encode(&content)?.len()),
                mode: Mode::Signatures,
                content,
                rank: None,
            };
            let cost = section_cost(&s, tok)?;
            Ok(Some((s, cost)))
        })
        .collect::<Result<_>>()?;
    for (&i, s) in rest.iter().zip(summaries) {
        if let Some((s, cost)) = s {
            if cost <= left {
                left -= cost;
                chosen[i] = Some(Mode::Signatures);
                sigs[i] = Some(s);
            }
        }
    }

    // Assemble (path order = index order), then check the exact document size.
    let mut packed: Vec<(usize, PackedFile)> = Vec::new();
    for i in 0..whole.len() {
        let f = match chosen[i] {
            Some(Mode::Whole) => whole[i].take(),
            Some(Mode::Signatures) => sigs[i].take(),
            None => None,
        };
        if let Some(mut f) = f {
            f.rank = Some(rank_of[i] + 1);
            packed.push((i, f));
        }
    }
    let document_tokens = loop {
        let doc = render_files(packed.iter().map(|(_, f)| f));
        let n = tok.encode(&doc)?.len();
        if n <= budget || packed.is_empty() {
            break n;
        }
        let worst = (0..packed.len())
            .max_by_key(|&k| rank_of[packed[k].0])
            .expect("not empty");
        let (i, _) = packed.remove(worst);
        chosen[i] = None;
    };

    let mut cut = Cut {
        max_tokens: budget,
        query: query.map(str::to_string),
        document_tokens,
        whole: Vec::new(),
        signatures: Vec::new(),
        dropped: Vec::new(),
    };
    for &i in &order {
        let list = match chosen[i] {
            Some(Mode::Whole) => &mut cut.whole,
            Some(Mode::Signatures) => &mut cut.signatures,
            None => &mut cut.dropped,
        };
        list.push(names[i].clone());
    }
    Ok((packed.into_iter().map(|(_, f)| f).collect(), cut))
}
