//! The server's core: admission, deadline, embedding and the batched forward for each
//! request, with per-stage metrics. Both adapters (HTTP and gRPC) call [`Server`] with
//! validated tasks and map [`ServeError`] to their status codes.

use crate::admission::{Admission, Refusal};
use crate::batcher::Batcher;
use crate::cache::Lru;
use crate::embedding::{EmbedFailure, Vectors};
use crate::forward::{self, Embedded, GroupContext, Job};
use crate::metrics::{Metrics, Refused, RouteCode, RouteStage, Stage};
use crate::sessions::Sessions;
use crate::task::{Context, ContextItem, FieldError, Item, Limits, PredictTask, RerankTask};
use gpo_core::model::Gpo;
use gpo_core::prompt::Template;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a request failed, in protocol-neutral terms.
#[derive(Debug, Clone, PartialEq)]
pub enum ServeError {
    /// Bad input (400 / INVALID_ARGUMENT).
    Invalid(FieldError),
    /// Unknown group session (404 / NOT_FOUND), naming `group_id`.
    NotFound(FieldError),
    /// Over the limits (429 / RESOURCE_EXHAUSTED).
    Busy,
    /// The deadline passed (504 / DEADLINE_EXCEEDED).
    Deadline,
    /// The server failed (500 / INTERNAL).
    Internal(String),
}

impl ServeError {
    /// The metrics label of the outcome.
    pub fn code(&self) -> &'static str {
        match self {
            ServeError::Invalid(_) => "invalid",
            ServeError::NotFound(_) => "not_found",
            ServeError::Busy => "busy",
            ServeError::Deadline => "deadline",
            ServeError::Internal(_) => "internal",
        }
    }
}

/// How the server is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// What a request may hold.
    pub limits: Limits,
    /// Requests running at once.
    pub concurrency: usize,
    /// Requests waiting beyond those.
    pub queue: usize,
    /// Each request's deadline, from arrival.
    pub deadline: Duration,
    /// Points (context + targets of all requests) in one forward pass.
    pub max_batch_points: usize,
    /// Forward threads (0: one per core).
    pub forward_threads: usize,
    /// Sessions kept.
    pub max_sessions: usize,
    /// Inline contexts kept, by content (0: none).
    pub context_cache: usize,
    /// Runs the jobs of a forward batch of equal context width as one padded pass. Off by
    /// default: a padded pass differs from a request's own pass in the last bits (measured
    /// up to 1 ulp), and a request alone is bitwise `gpo eval`'s computation.
    pub merge_forward: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            limits: Limits::default(),
            concurrency: 64,
            queue: 64,
            deadline: Duration::from_secs(10),
            max_batch_points: 4096,
            forward_threads: 0,
            max_sessions: 10_000,
            context_cache: 1024,
            merge_forward: false,
        }
    }
}

/// An inline context's identity: every question, option and probability, each length
/// prefixed, so two contexts share a key only when they are equal.
fn context_key(items: &[ContextItem]) -> Vec<u8> {
    let mut k = Vec::new();
    let text = |k: &mut Vec<u8>, s: &str| {
        k.extend_from_slice(&(s.len() as u64).to_le_bytes());
        k.extend_from_slice(s.as_bytes());
    };
    for c in items {
        text(&mut k, &c.item.question);
        k.extend_from_slice(&(c.item.options.len() as u64).to_le_bytes());
        for o in &c.item.options {
            text(&mut k, o);
        }
        for p in &c.distribution {
            k.extend_from_slice(&p.to_bits().to_le_bytes());
        }
    }
    k
}

type ForwardResult = Result<Vec<Vec<f32>>, String>;

/// The served model and everything around it.
pub struct Server {
    /// Configuration.
    pub options: Options,
    template: Template,
    vectors: Vectors,
    /// One forward thread per core: requests go round robin.
    forward: Vec<Batcher<Job, ForwardResult>>,
    next_forward: std::sync::atomic::AtomicUsize,
    sessions: Sessions,
    /// Inline contexts seen lately, by content: a client that sends the same context again
    /// (without a session) reuses its vectors and its encoding.
    contexts: Mutex<Lru<Vec<u8>, Arc<GroupContext>>>,
    admission: Admission,
    /// Metrics of this server.
    pub metrics: Metrics,
    info: serde_json::Value,
    ready: AtomicBool,
}

/// Runs a batch of jobs through [`forward::predict`]: with `merge`, those of equal context
/// width as one padded pass (padded on the target side only); without, each job alone.
fn run_forward(
    model: &Gpo,
    m: &Metrics,
    jobs: Vec<Job>,
    merge: bool,
    encoded: bool,
) -> Vec<ForwardResult> {
    let mut out: Vec<Option<ForwardResult>> = vec![None; jobs.len()];
    let passes: Vec<Vec<usize>> = if merge {
        let mut widths: Vec<usize> = jobs.iter().map(|j| j.context.points()).collect();
        widths.sort_unstable();
        widths.dedup();
        widths
            .into_iter()
            .map(|w| {
                (0..jobs.len())
                    .filter(|&i| jobs[i].context.points() == w)
                    .collect()
            })
            .collect()
    } else {
        (0..jobs.len()).map(|i| vec![i]).collect()
    };
    for idx in passes {
        let group: Vec<&Job> = idx.iter().map(|&i| &jobs[i]).collect();
        m.batch_requests
            .get_or_create(&Stage { stage: "forward" })
            .observe(group.len() as f64);
        m.batch_items
            .get_or_create(&Stage { stage: "forward" })
            .observe(group.iter().map(|j| j.points()).sum::<usize>() as f64);
        match forward::predict_with(model, &group, encoded) {
            Ok(p) => {
                for (&i, r) in idx.iter().zip(p) {
                    out[i] = Some(Ok(r));
                }
            }
            Err(e) => {
                for &i in &idx {
                    out[i] = Some(Err(e.to_string()));
                }
            }
        }
    }
    out.into_iter()
        .map(|o| o.unwrap_or_else(|| Err("no result".into())))
        .collect()
}

impl Server {
    /// A server of `model` reading embeddings from `vectors` rendered by `template`.
    /// `info` is the `/info` document.
    pub fn new(
        model: Arc<Gpo>,
        template: Template,
        vectors: Vectors,
        options: Options,
        metrics: Metrics,
        info: serde_json::Value,
    ) -> std::io::Result<Self> {
        let m = metrics.clone();
        let merge = options.merge_forward;
        let encoded = forward::encoded_path_is_exact(&model);
        if !encoded {
            tracing::warn!(
                "this model's encoded-context path does not reproduce the whole forward bit \
                 for bit on this CPU: every request runs the whole forward"
            );
        }
        let threads = match options.forward_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let forward = (0..threads)
            .map(|i| {
                let (model, m) = (model.clone(), m.clone());
                Batcher::spawn(
                    &format!("gpo-serve-forward-{i}"),
                    options.max_batch_points,
                    Job::points,
                    move |jobs| run_forward(&model, &m, jobs, merge, encoded),
                )
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut info = info;
        if let Some(o) = info.as_object_mut() {
            o.insert("encoded_context".into(), serde_json::Value::Bool(encoded));
        }
        Ok(Server {
            template,
            vectors,
            forward,
            next_forward: Default::default(),
            sessions: Sessions::new(options.max_sessions),
            contexts: Mutex::new(Lru::new(options.context_cache)),
            admission: Admission::new(options.concurrency, options.queue),
            metrics,
            info,
            ready: AtomicBool::new(false),
            options,
        })
    }

    /// The `/info` document.
    pub fn info(&self) -> &serde_json::Value {
        &self.info
    }

    /// Whether the warm-up request has passed.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Runs one request end to end (embedder and forward), then reports ready.
    pub async fn warm_up(&self) -> Result<(), ServeError> {
        let item = |q: &str| Item {
            question: q.into(),
            options: vec!["Yes".into(), "No".into()],
        };
        let task = PredictTask {
            context: Context::Inline(vec![ContextItem {
                item: item("Is this server warm?"),
                distribution: vec![0.5, 0.5],
            }]),
            targets: vec![item("Is it ready?")],
        };
        self.predict(task).await?;
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Admits, bounds by the deadline, times and counts a request on `route`.
    pub async fn handle<T>(
        &self,
        route: &'static str,
        work: impl Future<Output = Result<T, ServeError>>,
    ) -> Result<T, ServeError> {
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + self.options.deadline;
        self.metrics.in_flight.inc();
        let r = match self.admission.admit(deadline).await {
            Err(why) => Err(match why {
                Refusal::Busy => ServeError::Busy,
                Refusal::Deadline => ServeError::Deadline,
            }),
            Ok(_ticket) => tokio::time::timeout_at(deadline, work)
                .await
                .unwrap_or(Err(ServeError::Deadline)),
        };
        self.metrics.in_flight.dec();
        let code = match &r {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        if matches!(r, Err(ServeError::Busy | ServeError::Deadline)) {
            self.metrics
                .refusals
                .get_or_create(&Refused {
                    route,
                    reason: code,
                })
                .inc();
        }
        self.metrics
            .requests
            .get_or_create(&RouteCode { route, code })
            .inc();
        self.observe(route, "total", start);
        r
    }

    fn observe(&self, route: &'static str, stage: &'static str, since: Instant) {
        self.metrics
            .duration
            .get_or_create(&RouteStage { route, stage })
            .observe(since.elapsed().as_secs_f64());
    }

    /// Embeds items (each option rendered by the template); errors name `field[i].options[k]`.
    async fn embed(&self, items: &[&Item], field: &str) -> Result<Vec<Embedded>, ServeError> {
        let questions: Vec<_> = items
            .iter()
            .enumerate()
            .map(|(i, it)| forward::question(format!("{field}[{i}]"), it))
            .collect();
        let mut texts = Vec::new();
        let mut owner = Vec::new();
        for (i, q) in questions.iter().enumerate() {
            for (k, t) in forward::texts(self.template, q).into_iter().enumerate() {
                texts.push(t);
                owner.push((i, k));
            }
        }
        let vs = self.vectors.get(&texts).await.map_err(|e| match e {
            EmbedFailure::Text { index, message } => {
                let (i, k) = owner[index];
                let at = if field.is_empty() {
                    format!("candidates[{k}]")
                } else {
                    format!("{field}[{i}].options[{k}]")
                };
                ServeError::Invalid(FieldError::new(at, message))
            }
            EmbedFailure::Embedder(m) => ServeError::Internal(m),
        })?;
        let mut it = vs.into_iter();
        Ok(questions
            .into_iter()
            .map(|q| {
                let x = it.by_ref().take(q.options.len()).collect();
                Embedded { question: q, x }
            })
            .collect())
    }

    async fn group(
        &self,
        route: &'static str,
        c: &Context,
    ) -> Result<Arc<GroupContext>, ServeError> {
        match c {
            Context::Session(id) => self.sessions.get(id).ok_or_else(|| {
                ServeError::NotFound(FieldError::new(
                    "group_id",
                    format!("no group session `{id}` (it may have been evicted)"),
                ))
            }),
            Context::Inline(items) => {
                let key = context_key(items);
                let hit = self
                    .contexts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&key);
                if let Some(g) = hit {
                    self.metrics.context_hits.inc();
                    return Ok(g);
                }
                self.metrics.context_misses.inc();
                let t = Instant::now();
                let refs: Vec<&Item> = items.iter().map(|c| &c.item).collect();
                let questions = self.embed(&refs, "context").await?;
                self.observe(route, "embed", t);
                let g = Arc::new(GroupContext::new(
                    questions,
                    items.iter().map(|c| c.distribution.clone()).collect(),
                ));
                self.contexts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, g.clone());
                Ok(g)
            }
        }
    }

    async fn run(&self, route: &'static str, job: Job) -> Result<Vec<Vec<f32>>, ServeError> {
        let t = Instant::now();
        let k = self.next_forward.fetch_add(1, Ordering::Relaxed) % self.forward.len();
        let r = self.forward[k]
            .call(job)
            .await
            .map_err(|_| ServeError::Internal("the forward pass stopped".into()))?
            .map_err(ServeError::Internal);
        self.observe(route, "forward", t);
        r
    }

    /// Predicts each target's distribution over its options, in order.
    pub async fn predict(&self, task: PredictTask) -> Result<Vec<Vec<f32>>, ServeError> {
        let context = self.group("predict", &task.context).await?;
        let t = Instant::now();
        let refs: Vec<&Item> = task.targets.iter().collect();
        let targets = self.embed(&refs, "targets").await?;
        self.observe("predict", "embed", t);
        self.run("predict", Job { context, targets }).await
    }

    /// Scores each candidate as an option of the prompt: `(index, score)`, best first.
    pub async fn rerank(&self, task: RerankTask) -> Result<Vec<(usize, f32)>, ServeError> {
        let context = self.group("rerank", &task.context).await?;
        let t = Instant::now();
        let targets = self.embed(&[&task.item], "").await?;
        self.observe("rerank", "embed", t);
        let p = self.run("rerank", Job { context, targets }).await?;
        let dist = p.into_iter().next().unwrap_or_default();
        Ok(forward::rank(&dist))
    }

    /// Stores a group's embedded context; returns its id and size.
    pub async fn create_group(
        &self,
        context: Vec<ContextItem>,
    ) -> Result<(String, usize), ServeError> {
        let n = context.len();
        let g = self.group("groups", &Context::Inline(context)).await?;
        let id = self
            .sessions
            .create(g)
            .map_err(|e| ServeError::Internal(format!("a session id: {e}")))?;
        Ok((id, n))
    }
}
