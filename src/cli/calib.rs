//! `--calib`: the calibration mix, loaded (each source read and tokenized, its sha256 taken)
//! and sampled into windows. Sources are text files, named in the records by file name only.

use anyhow::{Context, Result};
use flexquant::model::load::LoadedModel;
use flexquant::quant::calib::{self, CalibSettings};
use flexquant::quant::library::{self, CalibSource};
use std::path::Path;

/// A loaded calibration mix: each source's record (its `sequences` not yet set) and tokens.
pub struct Mix {
    pub sources: Vec<(CalibSource, Vec<u32>)>,
}

impl Mix {
    /// Reads and tokenizes every source of `spec` (`calib::parse_mix`).
    pub fn load(spec: &str, m: &LoadedModel) -> Result<Mix> {
        let mut sources = Vec::new();
        for e in calib::parse_mix(spec)? {
            let path = Path::new(&e.source);
            let text = super::read_text(path)?;
            let ids = m
                .tokenizer
                .encode(&text)
                .with_context(|| format!("tokenizing {}", path.display()))?;
            let name = path
                .file_name()
                .map_or_else(|| e.source.clone(), |n| n.to_string_lossy().into());
            sources.push((
                CalibSource {
                    name,
                    sha256: library::file_sha256(path)?,
                    tokens: ids.len(),
                    weight: e.weight,
                    sequences: 0,
                },
                ids,
            ));
        }
        Ok(Mix { sources })
    }

    /// The calibration tokens for `s`, and the sources' records with their windows counted.
    pub fn sample(&self, s: CalibSettings) -> Result<(Vec<u32>, Vec<CalibSource>)> {
        let weights: Vec<f64> = self.sources.iter().map(|x| x.0.weight).collect();
        let shares = calib::allot(&weights, s.sequences)?;
        let inputs: Vec<(&[u32], f64)> = self
            .sources
            .iter()
            .map(|(r, ids)| (ids.as_slice(), r.weight))
            .collect();
        let tokens = calib::sample_mix(&inputs, s)?;
        let records = self
            .sources
            .iter()
            .zip(shares)
            .map(|((r, _), n)| CalibSource {
                sequences: n,
                ..r.clone()
            })
            .collect();
        Ok((tokens, records))
    }

    fn records(&self) -> Vec<CalibSource> {
        self.sources.iter().map(|x| x.0.clone()).collect()
    }

    /// The mix by names (`CalibSource::mix_name`).
    pub fn name(&self) -> String {
        CalibSource::mix_name(&self.records())
    }

    /// The mix's identity (`CalibSource::mix_sha256`).
    pub fn sha256(&self) -> String {
        CalibSource::mix_sha256(&self.records())
    }
}
