//! Reconciliation, Rust side (the SQL is `sql/48_reconcile.sql`).
//!
//! `reconcile(target, mode)` is called in a user's transaction, which the worker cannot see, so
//! the request reaches the worker through shared memory: the caller takes a slot and waits on
//! it (cancellable; a cancelled caller abandons the slot and the worker cancels the run); the
//! worker queues the run as a committed row, drives it, and marks the slot done.
//!
//! Each worker tick, [`Reconciler::tick`] moves every run one step, each step a short
//! transaction: queued runs start scanning (a SCIM target on the delivery runtime, page by page
//! as the pages arrive; a table target in one SQL statement), finished scans are compared, and
//! repairs and adoptions plan one batch through the ordinary planner.

use crate::deliver::targets;
use crate::deliver::txn::in_transaction;
use crate::error::Error;
use crate::{guc, shmem};
use identity_sync_core::deliver::{Dispatcher, ScanEvent, ScanRequest, ScannedAccount};
use pgrx::lwlock::PgLwLock;
use pgrx::pg_shmem_init;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::spi::SpiResult;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// Callers that may wait for a reconcile at once.
const SLOTS: usize = 8;
/// Accounts asked for per SCIM page (a service may send fewer; the scan adapts).
const PAGE_SIZE: usize = 500;
/// Scanned accounts written per transaction at most: pages that arrived together are written
/// together, up to this many.
const WRITE_BATCH: usize = 5000;

/// The state of a request slot.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
enum SlotState {
    #[default]
    Free = 0,
    /// A caller asked; the worker has not seen it yet.
    Asked,
    /// The worker queued run `run_id` (0: it could not, a run of that target is active).
    Taken,
    /// The run ended; the caller reads it and frees the slot.
    Done,
    /// The caller stopped waiting (cancelled); the worker cancels the run and frees the slot.
    Abandoned,
}

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct Slot {
    state: SlotState,
    repair: bool,
    target_id: i32,
    /// The session user that asked (an OID).
    role: u32,
    run_id: i64,
}

unsafe impl PGRXSharedMemory for Slot {}

static REQUESTS: PgLwLock<[Slot; SLOTS]> =
    unsafe { PgLwLock::new(c"identity_sync_reconcile_requests") };

/// From `_PG_init` while preloading.
pub fn init_shmem() {
    pg_shmem_init!(REQUESTS = [Slot::default(); SLOTS]);
}

/// Ask the worker for a run and wait until it ends; returns the run's id (0 when the worker
/// found a run of the target active). `sql/48_reconcile.sql` `reconcile()` has validated the
/// target and mode, and reads the run's summary.
#[pg_extern(volatile, parallel_unsafe, name = "_reconcile_wait")]
fn reconcile_wait(target_id: i32, mode: &str) -> i64 {
    wait_for_run(target_id, mode).unwrap_or_else(|e| e.report())
}

fn wait_for_run(target_id: i32, mode: &str) -> Result<i64, Error> {
    shmem::check_served()?;
    let role = unsafe { pg_sys::GetSessionUserId() }.to_u32();
    let slot = {
        let mut slots = REQUESTS.exclusive();
        let Some(i) = slots.iter().position(|s| s.state == SlotState::Free) else {
            return Err(Error::Busy(format!(
                "{SLOTS} reconcile requests are waiting already"
            )));
        };
        slots[i] = Slot {
            state: SlotState::Asked,
            repair: mode == "repair",
            target_id,
            role,
            run_id: 0,
        };
        i
    };
    shmem::wake_worker();

    // Wait, interruptibly. Whatever ends the wait (the run, a cancel, an error), the slot is
    // given back or abandoned, never left taken.
    let done = std::cell::Cell::new(false);
    let result = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
      let mut no_worker_since: Option<Instant> = None;
      loop {
        pg_sys::check_for_interrupts!();
        let s = REQUESTS.share()[slot];
        if s.state == SlotState::Done {
            done.set(true);
            return Ok(s.run_id);
        }
        if shmem::worker_pid().is_none() {
            let since = *no_worker_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(10) {
                return Err(Error::NoWorker {
                    detail: "The identity_sync worker has not been running for 10 seconds.".into(),
                    hint: "See the server log; the run, if it was queued, goes on when the worker is back (identity_sync.reconcile_run).".into(),
                });
            }
        } else {
            no_worker_since = None;
        }
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                20,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
      }
    }))
    .finally(|| {
        let mut slots = REQUESTS.exclusive();
        slots[slot].state = if done.get() || slots[slot].state == SlotState::Asked {
            SlotState::Free
        } else {
            SlotState::Abandoned
        };
    })
    .execute();
    shmem::wake_worker();
    result
}

/// The worker's side: the scans it has on the delivery runtime.
#[derive(Default)]
pub struct Reconciler {
    scanning: HashSet<i64>,
}

/// A queued run as `_reconcile_next()` hands it out.
struct Next {
    run_id: i64,
    target_id: i32,
    kind: String,
    paths: Vec<String>,
    groups: Vec<String>,
}

impl Reconciler {
    /// One step of every run. True when anything happened (the worker then ticks again soon).
    pub fn tick(&mut self, dispatcher: Option<&Dispatcher>, batch: i32) -> bool {
        let mut busy = self.serve_requests(dispatcher);
        busy |= self.start_queued(dispatcher);
        if let Some(d) = dispatcher {
            busy |= self.record_scans(d);
        }
        busy |= plan_step(batch);
        busy
    }

    /// Queue the runs callers asked for, finish the slots whose runs ended, cancel the runs
    /// whose callers went away.
    fn serve_requests(&mut self, dispatcher: Option<&Dispatcher>) -> bool {
        let slots: Vec<(usize, Slot)> = REQUESTS
            .share()
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, s)| !matches!(s.state, SlotState::Free | SlotState::Done))
            .collect();
        if slots.is_empty() {
            return false;
        }
        for (i, s) in slots {
            match s.state {
                SlotState::Asked => {
                    let mode = if s.repair { "repair" } else { "report" };
                    let run = in_transaction("queueing a reconcile", || {
                        Spi::get_one_with_args::<i64>(
                            "SELECT identity_sync._reconcile_queue($1, $2, $3::oid::regrole::text, false)",
                            &[s.target_id.into(), mode.into(), pg_sys::Oid::from(s.role).into()],
                        )
                    });
                    let Some(run) = run else { continue };
                    let run_id = run.ok().flatten().unwrap_or(0);
                    let mut all = REQUESTS.exclusive();
                    if all[i].state == SlotState::Asked {
                        all[i].run_id = run_id;
                        all[i].state = if run_id == 0 {
                            SlotState::Done
                        } else {
                            SlotState::Taken
                        };
                    }
                }
                SlotState::Taken => {
                    let ended = in_transaction("checking a reconcile", || {
                        Spi::get_one_with_args::<bool>(
                            "SELECT state IN ('done', 'failed', 'cancelled') FROM identity_sync.reconcile_run WHERE id = $1",
                            &[s.run_id.into()],
                        )
                    })
                    .and_then(|r| r.ok().flatten())
                    .unwrap_or(true);
                    if ended {
                        let mut all = REQUESTS.exclusive();
                        if all[i].state == SlotState::Taken {
                            all[i].state = SlotState::Done;
                        }
                    }
                }
                SlotState::Abandoned => {
                    if s.run_id != 0 {
                        if self.scanning.remove(&s.run_id) {
                            if let Some(d) = dispatcher {
                                d.cancel_scan(s.run_id);
                            }
                        }
                        in_transaction("cancelling a reconcile", || {
                            Spi::run_with_args(
                                "SELECT identity_sync._reconcile_fail($1, 'cancelled by the caller', 'cancelled')",
                                &[s.run_id.into()],
                            )
                        });
                    }
                    REQUESTS.exclusive()[i].state = SlotState::Free;
                }
                SlotState::Free | SlotState::Done => {}
            }
        }
        true
    }

    /// Start every queued run: table targets are read and compared at once, SCIM targets are
    /// handed to the delivery runtime.
    fn start_queued(&mut self, dispatcher: Option<&Dispatcher>) -> bool {
        let mut any = false;
        while let Some(Some(next)) = in_transaction("starting a reconcile", next_run) {
            any = true;
            let run = next.run_id;
            if next.kind == "table" {
                in_transaction("scanning a table target", || {
                    Spi::run_with_args(
                        "SELECT identity_sync._reconcile_scan_table($1)",
                        &[run.into()],
                    )
                });
                compare(run);
                continue;
            }
            let Some(d) = dispatcher else {
                fail(
                    run,
                    "the delivery thread is not running, so the target cannot be read (see the server log)",
                );
                continue;
            };
            let loaded = in_transaction("loading a target to scan", || -> SpiResult<_> {
                Ok((targets::load_target(next.target_id)?, expected(run)?))
            });
            let Some(Ok((Some(target), expected))) = loaded else {
                fail(
                    run,
                    "loading the target's settings failed (see the server log)",
                );
                continue;
            };
            d.scan(ScanRequest {
                run_id: run,
                target,
                paths: next.paths,
                groups: next.groups,
                expected,
                page_size: PAGE_SIZE,
                max_attempts: guc::MAX_ATTEMPTS.get().max(1) as u32,
            });
            self.scanning.insert(run);
        }
        any
    }

    /// Write what the scans read, in the order they read it: pages of accounts (those that
    /// arrived together in one transaction), the groups' members, then the comparison of a
    /// finished scan or the failure of a broken one. A page for a run that is no longer
    /// scanning (cancelled, its target dropped) stops that scan.
    fn record_scans(&mut self, d: &Dispatcher) -> bool {
        let events = d.take_scan_events();
        if events.is_empty() {
            return false;
        }
        let mut pending: Option<(i64, Vec<ScannedAccount>)> = None;
        for event in events {
            let run = event.run_id();
            if !self.scanning.contains(&run) {
                continue; // cancelled: what it read meanwhile is dropped
            }
            if let ScanEvent::Accounts { accounts, .. } = event {
                match &mut pending {
                    Some((r, page)) if *r == run && page.len() + accounts.len() <= WRITE_BATCH => {
                        page.extend(accounts)
                    }
                    _ => {
                        if let Some((r, page)) = pending.take() {
                            self.write(d, r, "_reconcile_page", &page);
                        }
                        pending = Some((run, accounts));
                    }
                }
                continue;
            }
            if let Some((r, page)) = pending.take() {
                self.write(d, r, "_reconcile_page", &page);
            }
            if !self.scanning.contains(&run) {
                continue;
            }
            match event {
                ScanEvent::Accounts { .. } => {}
                ScanEvent::Groups { members, .. } => {
                    self.write(d, run, "_reconcile_groups", &members);
                }
                ScanEvent::Done { summary, .. } => {
                    self.scanning.remove(&run);
                    if !summary.projected {
                        log!("identity_sync: reconcile run {run}: the target refused attributes=, so whole users were read");
                    }
                    if summary.found_by_id > 0 {
                        log!(
                            "identity_sync: reconcile run {run}: {} accounts that paging did not return were found by id",
                            summary.found_by_id
                        );
                    }
                    compare(run);
                }
                ScanEvent::Failed { error, .. } => {
                    self.scanning.remove(&run);
                    fail(run, &error);
                }
            }
        }
        if let Some((r, page)) = pending.take() {
            self.write(d, r, "_reconcile_page", &page);
        }
        true
    }

    /// One write of a scan's results (`function(run, json)`) in a transaction of its own. The
    /// function returns NULL when the run is no longer scanning: the scan is stopped. When the
    /// write fails, so does the run.
    fn write(&mut self, d: &Dispatcher, run: i64, function: &str, rows: &impl serde::Serialize) {
        if !self.scanning.contains(&run) {
            return;
        }
        let json = match serde_json::to_string(rows) {
            Ok(j) => j,
            Err(e) => {
                self.stop(d, run);
                fail(
                    run,
                    &format!("internal error: encoding a scanned page: {e}"),
                );
                return;
            }
        };
        let sql = format!("SELECT identity_sync.{function}($1, $2::jsonb)");
        let written = in_transaction("recording what a reconcile scan read", || {
            Spi::get_one_with_args::<bool>(&sql, &[run.into(), json.into()])
        });
        match written {
            Some(Ok(Some(true))) => {}
            Some(Ok(_)) => self.stop(d, run),
            _ => {
                self.stop(d, run);
                fail(
                    run,
                    "recording what the scan read failed (see the server log)",
                );
            }
        }
    }

    fn stop(&mut self, d: &Dispatcher, run: i64) {
        if self.scanning.remove(&run) {
            d.cancel_scan(run);
        }
    }
}

/// The ids of the accounts the registry holds in the run's target: those a SCIM scan's paging
/// misses are looked up one by one.
fn expected(run: i64) -> SpiResult<Vec<String>> {
    Ok(Spi::get_one_with_args::<Vec<String>>(
        "SELECT identity_sync._reconcile_expected($1)",
        &[run.into()],
    )?
    .unwrap_or_default())
}

fn next_run() -> Option<Next> {
    let mut next = None;
    Spi::connect_mut(|client| -> Result<(), pgrx::spi::Error> {
        let rows = client.update(
            "SELECT run_id, target_id, kind, paths, groups FROM identity_sync._reconcile_next()",
            None,
            &[],
        )?;
        for row in rows {
            next = Some(Next {
                run_id: row.get_by_name::<i64, _>("run_id")?.unwrap_or_default(),
                target_id: row.get_by_name::<i32, _>("target_id")?.unwrap_or_default(),
                kind: row.get_by_name::<String, _>("kind")?.unwrap_or_default(),
                paths: row
                    .get_by_name::<Vec<String>, _>("paths")?
                    .unwrap_or_default(),
                groups: row
                    .get_by_name::<Vec<String>, _>("groups")?
                    .unwrap_or_default(),
            });
        }
        Ok(())
    })
    .unwrap_or_else(|e| pgrx::error!("identity_sync: reading the next reconcile run: {e}"));
    next
}

fn compare(run: i64) {
    let compared = in_transaction("comparing a reconcile", || {
        Spi::run_with_args("SELECT identity_sync._reconcile_compare($1)", &[run.into()])
    });
    if !matches!(compared, Some(Ok(()))) {
        fail(
            run,
            "comparing the scan with the registry failed (see the server log)",
        );
    }
}

fn fail(run: i64, error: &str) {
    in_transaction("recording a failed reconcile", || {
        Spi::run_with_args(
            "SELECT identity_sync._reconcile_fail($1, $2)",
            &[run.into(), error.into()],
        )
    });
}

/// One planning batch of each repair or adoption under way. True when anything was planned.
fn plan_step(batch: i32) -> bool {
    let runs = in_transaction("listing reconciles that plan", || {
        Spi::connect(|client| -> Result<Vec<i64>, pgrx::spi::Error> {
            client
                .select(
                    "SELECT id FROM identity_sync.reconcile_run WHERE state = 'planning' ORDER BY id",
                    None,
                    &[],
                )?
                .map(|row| row.get_by_name::<i64, _>("id").map(Option::unwrap_or_default))
                .collect()
        })
    })
    .and_then(Result::ok)
    .unwrap_or_default();
    let mut any = false;
    for run in runs {
        let planned = in_transaction("planning a reconcile", || {
            Spi::get_one_with_args::<i32>(
                "SELECT identity_sync._reconcile_plan($1, $2)",
                &[run.into(), batch.into()],
            )
        });
        match planned {
            Some(Ok(Some(n))) if n > 0 => any = true,
            Some(Ok(_)) => {}
            _ => fail(run, "planning the repair failed (see the server log)"),
        }
    }
    any
}

/// At worker start: scans that were under way start again (their pages were in the process
/// that stopped).
pub fn recover() {
    if let Some(Ok(Some(n))) = in_transaction("recovering reconcile runs", || {
        Spi::get_one::<i32>("SELECT identity_sync._reconcile_recover()")
    }) {
        if n > 0 {
            log!("identity_sync: {n} reconcile scans were under way when the worker stopped; they start again");
        }
    }
}
