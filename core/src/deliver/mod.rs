//! The HTTP side of the background worker: delivers provisioning events to SCIM and webhook
//! targets on a tokio runtime in a thread of its own.
//!
//! PostgreSQL may only be called from the worker's main thread, so the split is: the main
//! thread claims events with SQL and [`Dispatcher::submit`]s them as [`Job`]s; the delivery
//! thread sends them, pushes [`Outcome`]s and calls the `notify` callback; the main thread then
//! [`Dispatcher::take_outcomes`] and records them in a short transaction. No call on the
//! dispatcher blocks on the network.
//!
//! Guarantees:
//! - jobs of one (target, person) are never in flight together and complete in submission
//!   order; when one does not succeed, the later queued jobs of that person are handed back as
//!   [`Outcome::Retry`] without being sent (the design's "later events wait");
//! - at most `max_concurrency` requests per target are in flight;
//! - every request carries `Idempotency-Key: <event_id>`;
//! - secrets never appear in an outcome's error text or in `Debug` output.
//!
//! The same runtime reads SCIM targets for `reconcile()`: [`Dispatcher::scan`] starts a scan
//! ([`scan`]), whose pages the main thread takes with [`Dispatcher::take_scan_events`] as they
//! arrive; [`Dispatcher::cancel_scan`] stops one. A scan's requests count against the target's
//! `max_concurrency` together with deliveries.

mod client;
mod config;
mod job;
mod scan;
mod scim;
mod webhook;

pub use config::{is_loopback_url, Auth, Secret, TargetConfig, TargetKind};
pub use job::{EventKind, Job, Outcome};
pub use scan::{GroupMembers, ScanEvent, ScanRequest, ScanSummary, ScannedAccount};

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use client::Client;
use scim::ScimTarget;

/// State shared between the caller's thread and the delivery thread.
struct Shared {
    outcomes: Mutex<Vec<Outcome>>,
    scan_events: Mutex<Vec<ScanEvent>>,
    in_flight: AtomicUsize,
    notify: Arc<dyn Fn() + Send + Sync>,
}

impl Shared {
    fn outcomes(&self) -> MutexGuard<'_, Vec<Outcome>> {
        // A panic while holding this lock cannot leave the Vec half-updated; keep going.
        self.outcomes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn scan_events(&self) -> MutexGuard<'_, Vec<ScanEvent>> {
        self.scan_events.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push_scan_event(&self, event: ScanEvent) {
        self.scan_events().push(event);
        (self.notify)();
    }

    fn push(&self, outcomes: Vec<Outcome>) {
        if outcomes.is_empty() {
            return;
        }
        let n = outcomes.len();
        self.outcomes().extend(outcomes);
        self.in_flight.fetch_sub(n, Ordering::SeqCst);
        (self.notify)();
    }
}

enum Command {
    Targets(Vec<TargetConfig>),
    Submit(Vec<Job>),
    Scan(Box<ScanRequest>),
    CancelScan(i64),
    Shutdown(Instant),
}

/// Runs deliveries on one background thread with a tokio runtime. See the module docs.
pub struct Dispatcher {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Command>,
    done: std::sync::mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl Dispatcher {
    /// Starts the delivery thread (named `identity_sync http`) with a current-thread tokio
    /// runtime. `notify` is called from that thread whenever outcomes are ready; keep it cheap
    /// (setting a latch).
    ///
    /// All signals are blocked in the new thread and in every thread it starts (the resolver's
    /// blocking pool), so PostgreSQL's signal handlers only ever run on the backend's own
    /// thread; the caller's signal mask is left as it was.
    pub fn start(notify: Arc<dyn Fn() + Send + Sync>) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            outcomes: Mutex::new(Vec::new()),
            scan_events: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            notify,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let (done_tx, done) = std::sync::mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        // (requests still running when `run` ends were aborted by it)
        let thread = spawn_runtime_thread(
            "identity_sync http",
            4,
            move || run(thread_shared, rx),
            move || {
                let _ = done_tx.send(());
            },
        )?;
        Ok(Dispatcher {
            shared,
            tx,
            done,
            thread: Some(thread),
        })
    }

    /// Replaces the set of targets (on configuration reload). Targets whose configuration is
    /// unchanged keep their HTTP client (and its open connections), OAuth token, cached
    /// ServiceProviderConfig and group ids; jobs already running finish with the old settings.
    pub fn set_targets(&self, targets: Vec<TargetConfig>) {
        let _ = self.tx.send(Command::Targets(targets));
    }

    /// Queues jobs for delivery; returns at once. A job for a target that is not configured
    /// comes back as [`Outcome::Retry`].
    pub fn submit(&self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let n = jobs.len();
        self.shared.in_flight.fetch_add(n, Ordering::SeqCst);
        if self.tx.send(Command::Submit(jobs)).is_err() {
            // The delivery thread is gone (it only stops on shutdown): nothing will send them.
            self.shared.in_flight.fetch_sub(n, Ordering::SeqCst);
        }
    }

    /// Takes the outcomes ready so far; never blocks on the network.
    pub fn take_outcomes(&self) -> Vec<Outcome> {
        std::mem::take(&mut *self.shared.outcomes())
    }

    /// Starts a reconcile scan of a SCIM target; returns at once. Its events (pages, then
    /// `Done` or `Failed`) come back through [`Dispatcher::take_scan_events`]. A scan of the
    /// same run already under way is replaced.
    pub fn scan(&self, request: ScanRequest) {
        let run_id = request.run_id;
        if self.tx.send(Command::Scan(Box::new(request))).is_err() {
            self.shared.push_scan_event(ScanEvent::Failed {
                run_id,
                error: "the delivery thread is not running".to_string(),
            });
        }
    }

    /// Stops the scan of run `run_id`, if one runs: no request of it is sent after this
    /// returns and its requests in flight are abandoned; events it produced before may still be
    /// taken (the caller drops them).
    pub fn cancel_scan(&self, run_id: i64) {
        let _ = self.tx.send(Command::CancelScan(run_id));
    }

    /// Takes the scan events ready so far, in the order each scan produced them.
    pub fn take_scan_events(&self) -> Vec<ScanEvent> {
        std::mem::take(&mut *self.shared.scan_events())
    }

    /// Jobs submitted whose outcome has not been produced yet (queued or being sent).
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Stops the delivery thread and returns the outcomes not yet taken.
    ///
    /// Requests in flight get until about three quarters of `grace` to finish; then they are
    /// abandoned (their events stay `sending` and are picked up again after a restart, which
    /// the idempotency key makes safe). Returns within `grace`, even if the thread is stuck.
    pub fn shutdown(mut self, grace: Duration) -> Vec<Outcome> {
        let start = Instant::now();
        let deadline = start + grace;
        let _ = self.tx.send(Command::Shutdown(start + grace.mul_f64(0.75)));
        let wait = deadline.saturating_duration_since(Instant::now());
        if self.done.recv_timeout(wait).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        } else {
            // Leave the thread behind rather than block the worker's exit.
            self.thread.take();
        }
        self.take_outcomes()
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        if self.thread.take().is_some() {
            let _ = self.tx.send(Command::Shutdown(Instant::now()));
        }
    }
}

/// Starts thread `name`, which runs the future `work()` makes on a current-thread tokio runtime
/// of its own (at most `max_blocking` threads for blocking work, such as the resolver's), with
/// every signal blocked in it and in the threads it starts (see [`Dispatcher::start`]). When
/// that future ends, the runtime's blocking threads are not waited for; then `finished` runs.
pub(crate) fn spawn_runtime_thread<W, F>(
    name: &str,
    max_blocking: usize,
    work: W,
    finished: impl FnOnce() + Send + 'static,
) -> io::Result<JoinHandle<()>>
where
    W: FnOnce() -> F + Send + 'static,
    F: std::future::Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(max_blocking)
        .thread_name(format!("{name} blocking"))
        .build()?;
    with_signals_blocked(|| {
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                runtime.block_on(work());
                runtime.shutdown_background();
                finished();
            })
    })
}

/// Runs `f` with every signal blocked in the calling thread, so that threads it spawns
/// inherit a fully blocked mask; restores the previous mask afterwards.
#[cfg(unix)]
pub(crate) fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigfillset/pthread_sigmask only write the sigset_t values we own here.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        let blocked = libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old) == 0;
        let out = f();
        if blocked {
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        }
        out
    }
}

#[cfg(not(unix))]
pub(crate) fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    f()
}

/// A target's live state on the delivery thread: its transport, and for SCIM what the service
/// said it supports and the group ids found so far.
enum Target {
    Scim(ScimTarget),
    Webhook(Client),
}

impl Target {
    fn new(config: TargetConfig) -> Self {
        match config.kind {
            TargetKind::Scim => Target::Scim(ScimTarget::new(Client::new(config))),
            TargetKind::Webhook => Target::Webhook(Client::new(config)),
        }
    }

    fn client(&self) -> &Client {
        match self {
            Target::Scim(t) => &t.client,
            Target::Webhook(c) => c,
        }
    }

    fn config(&self) -> &TargetConfig {
        &self.client().config
    }

    /// Delivers one job under the target's concurrency limit.
    async fn deliver(&self, job: &Job) -> Outcome {
        let _permit = match self.client().permit().await {
            Ok(p) => p,
            Err(e) => return e.outcome(job.event_id),
        };
        match self {
            Target::Scim(t) => scim::deliver(t, job).await,
            Target::Webhook(c) => webhook::deliver(c, job).await,
        }
    }
}

type PersonKey = (i32, String);

/// The delivery thread's loop: owns the targets, the per-person queues and the tasks.
async fn run(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Command>) {
    let mut targets: HashMap<i32, Arc<Target>> = HashMap::new();
    // A key is present while a job of that person is running; the deque holds those waiting.
    let mut queues: HashMap<PersonKey, VecDeque<Job>> = HashMap::new();
    let mut tasks: JoinSet<(PersonKey, Outcome)> = JoinSet::new();
    let mut running: HashMap<tokio::task::Id, (PersonKey, i64)> = HashMap::new();
    let mut scans: HashMap<i64, tokio::task::AbortHandle> = HashMap::new();

    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(Command::Targets(configs)) => {
                    let mut next = HashMap::new();
                    for c in configs {
                        let t = match targets.get(&c.id) {
                            Some(old) if *old.config() == c => Arc::clone(old),
                            _ => Arc::new(Target::new(c)),
                        };
                        next.insert(t.config().id, t);
                    }
                    targets = next;
                }
                Some(Command::Submit(jobs)) => {
                    for job in jobs {
                        let key = (job.target_id, job.person_key.clone());
                        match queues.get_mut(&key) {
                            Some(q) => q.push_back(job),
                            None => {
                                queues.insert(key.clone(), VecDeque::new());
                                spawn_job(&mut tasks, &mut running, &targets, key, job);
                            }
                        }
                    }
                }
                Some(Command::Scan(request)) => {
                    scans.retain(|_, h| !h.is_finished());
                    if let Some(old) = scans.remove(&request.run_id) {
                        old.abort();
                    }
                    let run_id = request.run_id;
                    // The delivery's own target, so the scan shares its concurrency limit,
                    // connections and token; a new one when the settings just changed.
                    let target = targets
                        .get(&request.target.id)
                        .filter(|t| *t.config() == request.target)
                        .cloned()
                        .unwrap_or_else(|| Arc::new(Target::new(request.target.clone())));
                    scans.insert(run_id, spawn_scan(&shared, target, *request));
                }
                Some(Command::CancelScan(run_id)) => {
                    if let Some(h) = scans.remove(&run_id) {
                        h.abort();
                    }
                }
                Some(Command::Shutdown(deadline)) => {
                    scans.values().for_each(|h| h.abort());
                    drain_until(&shared, &mut tasks, &mut running, deadline).await;
                    tasks.abort_all();
                    break;
                }
                // The Dispatcher was dropped without shutdown: nobody will read outcomes.
                None => {
                    scans.values().for_each(|h| h.abort());
                    tasks.abort_all();
                    break;
                }
            },
            Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let (key, outcome) = finished(&mut running, joined);
                let mut out = vec![outcome];
                let succeeded = matches!(out[0], Outcome::Done { .. });
                let account_id = match &out[0] {
                    Outcome::Done { account_id, .. } => account_id.clone(),
                    _ => None,
                };
                let failed_event = out[0].event_id();
                if let Some(mut q) = queues.remove(&key) {
                    if succeeded {
                        if let Some(mut job) = q.pop_front() {
                            // A create queued ahead of this job just told us the account id.
                            if job.account_id.is_none() {
                                job.account_id = account_id;
                            }
                            spawn_job(&mut tasks, &mut running, &targets, key.clone(), job);
                            queues.insert(key, q);
                        }
                    } else {
                        out.extend(q.into_iter().map(|j| Outcome::retry(
                            j.event_id,
                            format!("not sent: earlier event {failed_event} of this person did not succeed"),
                        )));
                    }
                }
                shared.push(out);
            }
        }
    }
}

/// Runs a scan as a task of its own; a scan that panics ends with `Failed`, so the worker is
/// never left waiting for it.
fn spawn_scan(
    shared: &Arc<Shared>,
    target: Arc<Target>,
    request: ScanRequest,
) -> tokio::task::AbortHandle {
    let run_id = request.run_id;
    let emit_to = Arc::clone(shared);
    let scan = tokio::spawn(async move {
        scan::run(target, request, |e| emit_to.push_scan_event(e)).await;
    });
    let abort = scan.abort_handle();
    let watch = Arc::clone(shared);
    tokio::spawn(async move {
        if let Err(e) = scan.await {
            if e.is_panic() {
                watch.push_scan_event(ScanEvent::Failed {
                    run_id,
                    error: "internal error: the scan panicked".to_string(),
                });
            }
        }
    });
    abort
}

/// Waits for running tasks to finish until `deadline`, recording their outcomes.
async fn drain_until(
    shared: &Shared,
    tasks: &mut JoinSet<(PersonKey, Outcome)>,
    running: &mut HashMap<tokio::task::Id, (PersonKey, i64)>,
    deadline: Instant,
) {
    let sleep = tokio::time::sleep_until(deadline.into());
    tokio::pin!(sleep);
    while !tasks.is_empty() {
        tokio::select! {
            _ = &mut sleep => return,
            Some(joined) = tasks.join_next_with_id() => {
                let (_, outcome) = finished(running, joined);
                shared.push(vec![outcome]);
            }
        }
    }
}

/// Turns a joined task into its outcome; a panicked task becomes a retry.
fn finished(
    running: &mut HashMap<tokio::task::Id, (PersonKey, i64)>,
    joined: Result<(tokio::task::Id, (PersonKey, Outcome)), tokio::task::JoinError>,
) -> (PersonKey, Outcome) {
    match joined {
        Ok((id, result)) => {
            running.remove(&id);
            result
        }
        Err(e) => {
            let (key, event_id) = running
                .remove(&e.id())
                .unwrap_or_else(|| ((0, String::new()), 0));
            let why = if e.is_panic() {
                "panicked"
            } else {
                "was cancelled"
            };
            (
                key,
                Outcome::retry(event_id, format!("internal error: delivery task {why}")),
            )
        }
    }
}

fn spawn_job(
    tasks: &mut JoinSet<(PersonKey, Outcome)>,
    running: &mut HashMap<tokio::task::Id, (PersonKey, i64)>,
    targets: &HashMap<i32, Arc<Target>>,
    key: PersonKey,
    job: Job,
) {
    let target = targets.get(&job.target_id).cloned();
    let event_id = job.event_id;
    let task_key = key.clone();
    let handle = tasks.spawn(async move {
        let outcome = match target {
            None => Outcome::retry(
                job.event_id,
                format!(
                    "target {} is not configured in the delivery thread",
                    job.target_id
                ),
            ),
            Some(t) => t.deliver(&job).await,
        };
        (task_key, outcome)
    });
    running.insert(handle.id(), (key, event_id));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map};

    #[test]
    fn debug_output_hides_secrets() {
        let config = TargetConfig {
            id: 1,
            name: "t".into(),
            kind: TargetKind::Scim,
            url: "http://127.0.0.1:1/v2".into(),
            auth: Auth::Basic {
                username: "svc".into(),
                password: "pw-s3cr3t".into(),
            },
            signing_secret: Some("whsec_s3cr3t".into()),
            timeout: Duration::from_secs(1),
            max_concurrency: 1,
            correlate_on: None,
            create_groups: false,
            ..TargetConfig::default()
        };
        let text = format!("{config:?}");
        assert!(!text.contains("s3cr3t") && text.contains("svc"), "{text}");
        let bearer = format!(
            "{:?}",
            Auth::Bearer {
                token: "tok-s3cr3t".into()
            }
        );
        assert!(!bearer.contains("s3cr3t"));
        let mut attributes = Map::new();
        attributes.insert("password".into(), json!("pw-s3cr3t"));
        attributes.insert("urn:x:User:Password".into(), json!("pw-s3cr3t"));
        attributes.insert("userName".into(), json!("zoe"));
        let job = Job {
            event_id: 1,
            target_id: 1,
            person_key: "p".into(),
            kind: EventKind::Create,
            account_id: None,
            changed: attributes.clone(),
            previous: Map::new(),
            attributes,
            group: None,
            groups: vec![],
            occurred_at: String::new(),
            attempt: 1,
        };
        let text = format!("{job:?}");
        assert!(!text.contains("s3cr3t") && text.contains("zoe"), "{text}");
    }

    #[test]
    fn event_kinds_round_trip() {
        for k in [
            EventKind::Create,
            EventKind::Update,
            EventKind::Enable,
            EventKind::Disable,
            EventKind::Delete,
            EventKind::Grant,
            EventKind::Revoke,
        ] {
            assert_eq!(k.as_str().parse::<EventKind>(), Ok(k));
        }
        assert!("nope".parse::<EventKind>().is_err());
    }
}
