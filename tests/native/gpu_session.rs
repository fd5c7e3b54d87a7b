//! The step-wise GPU session (`Session::start` / `next`) that the browser runtime drives one
//! token per call: it matches the callback form, survives a module swap between tokens, and
//! after `replace_model` (a device-loss rebuild) continues exactly as if nothing happened.

use crate::gpu_util::gpu_arc;
use flexquant::cpu::CpuModel;
use flexquant::gpu::ModelOptions;
use flexquant::model::load;
use flexquant::quant::weights::{gpu_model, rtn_base, rtn_modules};
use flexquant::runtime::backend::KvFormat;
use flexquant::runtime::reference::Reference;
use flexquant::runtime::{Backend, Sampling, Session, StopReason};
use pollster::block_on;

const OPTS: ModelOptions = ModelOptions {
    context: 96,
    max_batch: 16,
    logit_rows: 1,
    top_k: 8,
    fuse_norm: None,
    fuse_modules: None,
    kv_format: KvFormat::F16,
};

fn greedy(max_tokens: usize) -> Sampling {
    Sampling {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        max_tokens,
        seed: 1,
        ..Sampling::default()
    }
}

/// The tiny model and its modules at 4 bits (RTN, groups of 32).
fn tiny_4bit() -> (
    load::LoadedModel,
    Vec<flexquant::ensemble::format::PackedMatrix>,
) {
    let dir = tempfile::tempdir().unwrap();
    flexquant::model::tiny::write_tiny_model(dir.path(), 7).unwrap();
    let m = load::load(dir.path()).unwrap();
    let modules = rtn_modules(&m.weights, |_| 4, 32).unwrap();
    (m, modules)
}

#[test]
fn step_wise_session_matches_generate_and_survives_a_model_replacement() {
    let Some(gpu) = gpu_arc() else { return };
    let (m, modules) = tiny_4bit();
    let w = &m.weights;
    let model = || block_on(gpu_model(gpu.clone(), w, &modules, OPTS)).unwrap();
    // Longer than max_batch, so the re-prefill runs in several chunks.
    let prompt = m
        .tokenizer
        .encode("It is a truth universally acknowledged, that a single man")
        .unwrap();
    assert!(prompt.len() > OPTS.max_batch);
    let none: [u32; 0] = [];

    let mut a = Session::new(model());
    let (want, stats) = block_on(a.generate(&prompt, &greedy(12), &none, |_| true)).unwrap();
    assert_eq!(
        (want.len(), stats.stopped_by),
        (12, Some(StopReason::MaxTokens))
    );

    // Step by step, replacing the model (a fresh KV cache, re-prefilled) after 5 tokens.
    let mut b = Session::new(model());
    let mut turn = block_on(b.start(&prompt, &greedy(12), &none)).unwrap();
    let mut got = Vec::new();
    while let Some(id) = block_on(b.next(&mut turn)).unwrap() {
        got.push(id);
        if got.len() == 5 {
            let n = block_on(b.replace_model(model())).unwrap();
            assert_eq!(n, prompt.len() + 4, "the prompt and the tokens run so far");
            assert_eq!(b.model.len(), n);
        }
    }
    assert!(turn.is_done());
    assert_eq!(got, want);
    assert_eq!(turn.stats.stopped_by, Some(StopReason::MaxTokens));
    assert_eq!(turn.stats.generated, 12);

    // An early stop, then the next turn reuses the cached prefix.
    let mut turn = block_on(b.start(&prompt, &greedy(12), &none)).unwrap();
    assert_eq!(
        turn.stats.prefilled, 1,
        "all but the last prompt token came from the cache"
    );
    block_on(b.next(&mut turn)).unwrap().unwrap();
    turn.stop(StopReason::Caller);
    assert_eq!(block_on(b.next(&mut turn)).unwrap(), None);
    assert_eq!(
        (turn.stats.stopped_by, turn.stats.generated),
        (Some(StopReason::Caller), 1)
    );
    b.reset();
    assert!(b.tokens().is_empty() && b.model.is_empty());
}

/// `Backend::watch` on the GPU and the reference: a token far outside the top-k comes back
/// with its exact logit (read from the logits buffer in the token's submission), a watched
/// token already among the candidates is not repeated, and a logit bias of +100 on it makes
/// greedy decoding pick it (-100 on the best token: the runner-up).
#[test]
fn watched_tokens_return_their_logits_so_logit_bias_is_exact() {
    let Some(gpu) = gpu_arc() else { return };
    let (m, modules) = tiny_4bit();
    let w = &m.weights;
    let prompt = m.tokenizer.encode("It is a truth universally").unwrap();
    let mut g = block_on(gpu_model(gpu.clone(), w, &modules, OPTS)).unwrap();
    let full = block_on(g.logits_last(&prompt)).unwrap();
    let order = |l: &[f32]| {
        let mut ids: Vec<u32> = (0..l.len() as u32).collect();
        ids.sort_by(|a, b| l[*b as usize].total_cmp(&l[*a as usize]));
        ids
    };
    let ranked = order(&full);
    let (best, second, last) = (ranked[0], ranked[1], *ranked.last().unwrap());

    g.truncate(0);
    Backend::watch(&mut g, &[last, best]).unwrap();
    let cand = block_on(Backend::step(&mut g, &prompt)).unwrap();
    assert_eq!(cand.len(), OPTS.top_k as usize + 1, "best is not repeated");
    assert_eq!(cand[0].0, best);
    assert_eq!(cand.last().unwrap(), &(last, full[last as usize]));
    assert!(Backend::watch(&mut g, &[w.config.vocab_size as u32]).is_err());

    let mut r = Reference::new(w.clone(), 96);
    Backend::watch(&mut r, &[last]).unwrap();
    let rc = block_on(Backend::step(&mut r, &prompt)).unwrap();
    assert_eq!(rc.len(), 41);
    assert_eq!(rc.last().unwrap().0, last);

    let first = |bias: Vec<(u32, f32)>| {
        let mut s = Session::new(block_on(gpu_model(gpu.clone(), w, &modules, OPTS)).unwrap());
        let sampling = Sampling {
            logit_bias: bias,
            ..greedy(2)
        };
        let (out, _) = block_on(s.generate(&prompt, &sampling, &[], |_| true)).unwrap();
        out[0]
    };
    assert_eq!(first(vec![]), best);
    assert_eq!(first(vec![(last, 100.0)]), last);
    assert_eq!(first(vec![(best, -100.0)]), second);
}

/// A final norm of `f32::MAX` overflows every logit to ±inf or NaN: sampling the first token
/// is a typed `NonFiniteLogits` error (not a panic, not `input`) on the reference, the packed
/// CPU backend and the GPU engine, and the KV cache holds exactly the prompt afterwards.
#[test]
fn non_finite_logits_are_a_typed_error_on_every_backend() {
    let (m, modules) = tiny_4bit();
    let mut w = m.weights.clone();
    w.final_norm.iter_mut().for_each(|g| *g = f32::MAX);
    let prompt = m.tokenizer.encode("It is a truth universally").unwrap();
    let mut all = Reference::new(w.clone(), 96).with_top_k(usize::MAX);
    let finite = block_on(Backend::step(&mut all, &prompt)).unwrap();
    assert!(finite.is_empty(), "precondition: every logit overflows");
    fn first_token<B: Backend>(b: B, prompt: &[u32]) -> String {
        let mut s = Session::new(b);
        let mut turn = block_on(s.start(prompt, &greedy(4), &[])).unwrap();
        let e = block_on(s.next(&mut turn)).unwrap_err().to_string();
        assert_eq!(s.model.len(), prompt.len(), "the cache holds the prompt");
        e
    }
    let want = flexquant::Error::NonFiniteLogits {
        tokens: prompt.len(),
    }
    .to_string();
    assert_eq!(first_token(Reference::new(w.clone(), 96), &prompt), want);
    let base = rtn_base(&w, 32).unwrap();
    let cpu = CpuModel::new(
        &w.config,
        base.into(),
        modules.clone(),
        96,
        KvFormat::F16,
        None,
    )
    .unwrap();
    assert_eq!(first_token(cpu, &prompt), want);
    let Some(gpu) = gpu_arc() else { return };
    let g = block_on(gpu_model(gpu, &w, &modules, OPTS)).unwrap();
    assert_eq!(first_token(g, &prompt), want);
}

/// A KV cache given up under the session (`release_kv`: what `gpu::Model::convert_kv` does when
/// undoing a refused conversion fails too) is run again from the session's tokens
/// (`Session::restore_cache`): mid-answer the next token is the uninterrupted run's, and the
/// next turn reuses nothing it does not hold; on the packed CPU backend and the GPU engine.
#[test]
fn a_cache_given_up_under_the_session_is_run_again() {
    fn check<B: Backend>(make: impl Fn() -> B, prompt: &[u32], name: &str) {
        let none: [u32; 0] = [];
        let mut a = Session::new(make());
        let (want, _) = block_on(a.generate(prompt, &greedy(10), &none, |_| true)).unwrap();
        let mut b = Session::new(make());
        let mut turn = block_on(b.start(prompt, &greedy(10), &none)).unwrap();
        let mut got = Vec::new();
        while let Some(id) = block_on(b.next(&mut turn)).unwrap() {
            got.push(id);
            if got.len() == 4 {
                b.model.release_kv();
            }
        }
        assert_eq!(got, want, "{name}: after the cache was given up mid-answer");
        assert_eq!(b.model.len(), b.tokens().len(), "{name}");
        // Between turns: the next prompt shares the whole conversation, but the cache holds
        // none of it.
        let mut next = prompt.to_vec();
        next.extend(&want[..9]);
        let mut c = Session::new(make());
        let (want2, _) = block_on(c.generate(&next, &greedy(4), &none, |_| true)).unwrap();
        b.model.release_kv();
        let turn = block_on(b.start(&next, &greedy(4), &none)).unwrap();
        assert_eq!(turn.stats.prefilled, next.len(), "{name}: nothing reused");
        let mut turn = turn;
        let mut got2 = Vec::new();
        while let Some(id) = block_on(b.next(&mut turn)).unwrap() {
            got2.push(id);
        }
        assert_eq!(got2, want2, "{name}: the turn after");
    }
    let (m, modules) = tiny_4bit();
    let w = &m.weights;
    let prompt = m.tokenizer.encode("It is a truth universally").unwrap();
    let base = std::sync::Arc::new(rtn_base(w, 32).unwrap());
    let cpu = || {
        let b = base.clone();
        CpuModel::new(&w.config, b, modules.clone(), 96, KvFormat::F16, None).unwrap()
    };
    check(cpu, &prompt, "cpu");
    let Some(gpu) = gpu_arc() else { return };
    check(
        || block_on(gpu_model(gpu.clone(), w, &modules, OPTS)).unwrap(),
        &prompt,
        "gpu",
    );
}

/// A conversation moved by its KV cache's bytes (`Session::export` / `import`, the browser's
/// `exportSession` / `importSession`) from a GPU model to a new one, in f16 and in int8: the
/// next request runs only its new tokens and answers as the first model does, to the bit; the
/// GPU's bytes are the CPU backend's layout (the same conversation exported by both widens to
/// the same values within f16 rounding) and a CPU model goes on from them; a cache longer
/// than the context is refused and the conversation kept.
#[test]
fn a_conversation_moves_between_models_and_backends_by_its_kv_bytes() {
    let Some(gpu) = gpu_arc() else { return };
    let (m, modules) = tiny_4bit();
    let w = &m.weights;
    let c = &w.config;
    let prompt = m
        .tokenizer
        .encode("It is a truth universally acknowledged")
        .unwrap();
    let model = |format| {
        let opts = ModelOptions {
            kv_format: format,
            ..OPTS
        };
        block_on(gpu_model(gpu.clone(), w, &modules, opts)).unwrap()
    };
    let base = std::sync::Arc::new(rtn_base(w, 32).unwrap());
    let cpu = || CpuModel::new(c, base.clone(), modules.clone(), 96, KvFormat::F16, None).unwrap();
    fn answer<B: Backend>(s: &mut Session<B>, p: &[u32]) -> (usize, Vec<u32>) {
        let mut t = block_on(s.start(p, &greedy(6), &[])).unwrap();
        let prefilled = t.stats.prefilled;
        let mut out = vec![];
        while let Some(id) = block_on(s.next(&mut t)).unwrap() {
            out.push(id);
        }
        (prefilled, out)
    }
    fn export<B: Backend>(s: &Session<B>) -> (Vec<u32>, Vec<Vec<u8>>) {
        let mut parts = vec![];
        let tokens = block_on(s.export(&mut |p| parts.push(p.to_vec())))
            .unwrap()
            .to_vec();
        (tokens, parts)
    }
    fn import<B: Backend>(s: &mut Session<B>, tokens: &[u32], f: KvFormat, parts: &[Vec<u8>]) {
        let mut next = parts.iter();
        block_on(s.import(tokens, f, &mut |p| p.copy_from_slice(next.next().unwrap()))).unwrap();
    }
    for format in [KvFormat::F16, KvFormat::Int8] {
        let mut a = Session::new(model(format));
        answer(&mut a, &prompt);
        let (tokens, parts) = export(&a);
        assert_eq!(tokens, a.tokens());
        let (n, bytes) = flexquant::runtime::backend::kv_parts(c, format, tokens.len());
        assert_eq!(parts.len(), n);
        assert!(parts.iter().all(|p| p.len() as u64 == bytes));
        let mut more = tokens.clone();
        more.extend(&prompt[..5]);

        let mut b = Session::new(model(KvFormat::F16));
        import(&mut b, &tokens, format, &parts);
        assert_eq!(b.model.kv_format(), Some(format));
        let (pa, want) = answer(&mut a, &more);
        let (pb, got) = answer(&mut b, &more);
        assert_eq!((pa, pb), (5, 5), "{format}: only the new tokens ran");
        assert_eq!(got, want, "{format}: the same answer on the new model");
        assert_eq!(
            a.model.log_z().to_bits(),
            b.model.log_z().to_bits(),
            "{format}"
        );

        // Refused (longer than the context): the conversation stays.
        let held = b.tokens().to_vec();
        let long: Vec<u32> = (0..200).map(|i| 3 + i % 200).collect();
        let e = block_on(b.import(&long, format, &mut |_| panic!("nothing is filled")));
        assert!(e.is_err());
        assert_eq!((b.tokens(), b.model.len()), (&held[..], held.len()));

        if format == KvFormat::F16 {
            // The GPU's bytes are the CPU backend's: the same conversation exported by both.
            let mut on_cpu = Session::new(cpu());
            answer(&mut on_cpu, &prompt);
            let (cpu_tokens, cpu_parts) = export(&on_cpu);
            assert_eq!(cpu_tokens, tokens, "both backends answered the same");
            let layout = flexquant::runtime::backend::KvLayout::of(c, format);
            for (g, h) in parts.iter().zip(&cpu_parts) {
                let (g, h) = (
                    flexquant::cpu::kv::widened(g, &layout),
                    flexquant::cpu::kv::widened(h, &layout),
                );
                let scale = h.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-3);
                let diff = g
                    .iter()
                    .zip(&h)
                    .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
                assert!(
                    diff <= 1e-2 * scale,
                    "GPU and CPU KV bytes differ by {diff} (scale {scale})"
                );
            }
            // A CPU model goes on from the GPU's cache.
            let mut moved = Session::new(cpu());
            import(&mut moved, &tokens, format, &parts);
            let (p, out) = answer(&mut moved, &more);
            assert_eq!(
                (p, out.len()),
                (5, 6),
                "the CPU model runs only the new tokens"
            );
        }
    }
}

/// A prompt scored on the GPU (`Backend::step_scored`: `logit_rows` positions per pass, their
/// log-probabilities computed on the device without alternatives, read back and ranked with
/// them) past a cached prefix: each token's entry is the log-softmax of its position's logits
/// computed alone, its alternatives that row's best; the last step's candidates are a decode
/// step's; the cache holds every token after.
#[test]
fn a_prompt_scored_on_the_gpu_is_the_log_softmax_of_each_position() {
    use flexquant::model::math::log_sum_exp;
    use flexquant::runtime::generate::top_k;
    let Some(gpu) = gpu_arc() else { return };
    let (m, modules) = tiny_4bit();
    let w = &m.weights;
    let text = "It is a truth universally acknowledged, that a single man";
    let tokens = m.tokenizer.encode(text).unwrap();
    let (before, prompt) = tokens.split_at(5);
    let opts = ModelOptions {
        logit_rows: 4,
        ..OPTS
    };
    let mut g = block_on(gpu_model(gpu.clone(), w, &modules, opts)).unwrap();
    let rows: Vec<Vec<f32>> = (before.len()..tokens.len() - 1)
        .map(|end| {
            g.truncate(0);
            block_on(g.logits_last(&tokens[..=end])).unwrap()
        })
        .collect();
    g.truncate(0);
    let decode = block_on(Backend::step(&mut g, &tokens)).unwrap();
    for n in [0, 3] {
        g.truncate(0);
        block_on(g.prefill(before)).unwrap();
        let (cand, scored) = block_on(Backend::step_scored(&mut g, prompt, n, &[])).unwrap();
        assert_eq!(g.len(), tokens.len(), "n {n}");
        assert_eq!(scored.len(), prompt.len() - 1);
        assert_eq!(cand.len(), decode.len());
        for (a, b) in cand.iter().zip(&decode) {
            assert!(
                a.0 == b.0 && (a.1 - b.1).abs() < 1e-3,
                "n {n}: {a:?} vs {b:?}"
            );
        }
        for (i, (s, row)) in scored.iter().zip(&rows).enumerate() {
            let log_z = log_sum_exp(row);
            assert_eq!(s.id, prompt[i + 1]);
            let want = row[s.id as usize] as f64 - log_z;
            assert!(
                (s.logprob as f64 - want).abs() < 1e-3,
                "n {n}, token {i}: {s:?} vs {want}"
            );
            let best = top_k(row, n);
            assert_eq!(s.top.len(), n);
            for (a, b) in s.top.iter().zip(&best) {
                let want = b.1 as f64 - log_z;
                assert!(
                    a.0 == b.0 && (a.1 as f64 - want).abs() < 1e-3,
                    "n {n}, token {i}"
                );
            }
        }
    }
}
