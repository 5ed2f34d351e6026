//! One operation at a time on a VM.
//!
//! Pause, resume, the memory digest, snapshots, shutdown and (next)
//! migration all drive the same vCPUs: a snapshot pauses them to capture
//! state, and a client's resume arriving in the middle would let the guest
//! run between the last memory copy and the state capture (an image that
//! verifies but restores to a hung guest). [`VmController`] owns the VM's
//! operations so that this cannot happen:
//!
//! - At most one operation holds the VM. Short ones (pause, resume, digest)
//!   wait their turn behind other short ones; an operation that arrives
//!   while a long one (snapshot, shutdown, migration) holds the VM gets
//!   [`ControlError::Busy`], which names what is running, except:
//! - Pause and resume during a snapshot are recorded as the state the user
//!   wants and applied when the snapshot ends ([`Applied::Deferred`]). An
//!   operation that pauses the guest for its own purposes always leaves it
//!   in the state the user last asked for.
//! - Once a shutdown was requested, only status questions are answered.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_image::Hash32;
use ferry_vmm::{RunState, Vm};
use serde::Serialize;

use crate::migration::{
    migrate_out, resume_postcopy, settle_commit, MigrateRequest, MigrationError, MigrationProgress, MigrationState,
    MigrationStats, PostcopyResume, ProgressHandle, SettleWant, Settled, Unsettled,
};
use crate::snapshot::{take_snapshot, SnapshotError, SnapshotRequest, SnapshotStats};
use crate::LazyCompletion;

/// How long a short operation waits for another short one to finish.
pub const SHORT_WAIT: Duration = Duration::from_secs(30);

/// What can hold a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Pausing the vCPUs.
    Pause,
    /// Resuming them.
    Resume,
    /// Hashing guest memory while paused.
    Digest,
    /// Writing an image.
    Snapshot,
    /// Asking the guest to stop.
    Shutdown,
    /// Moving the VM to another host.
    Migration,
    /// Pausing briefly to read a vCPU's registers (live memory analysis).
    Registers,
}

impl Operation {
    /// Short operations finish in milliseconds to a second; others wait for them.
    fn is_short(self) -> bool {
        matches!(self, Operation::Pause | Operation::Resume | Operation::Digest | Operation::Registers)
    }

    /// The name used in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Pause => "pause",
            Operation::Resume => "resume",
            Operation::Digest => "memory digest",
            Operation::Snapshot => "snapshot",
            Operation::Shutdown => "shutdown",
            Operation::Migration => "migration",
            Operation::Registers => "register read",
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state a user asked for; operations that pause the guest for their
/// own purposes restore it when they end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Intent {
    /// The user wants the guest running.
    Running,
    /// The user wants it paused.
    Paused,
}

/// How a pause or resume was carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "applied")]
pub enum Applied {
    /// Done: the VM is in the requested state now.
    Now,
    /// Recorded; applied when the operation named ends.
    Deferred {
        /// The operation that holds the VM.
        until: Operation,
    },
}

/// The operation holding the VM, for `GET /vm`.
#[derive(Clone, Debug, Serialize)]
pub struct OperationInfo {
    /// What runs.
    pub kind: Operation,
    /// For how long.
    pub elapsed_ms: f64,
}

/// What the controller adds to the VM's own status.
#[derive(Clone, Debug, Serialize)]
pub struct ControlStatus {
    /// The operation holding the VM, if any.
    pub operation: Option<OperationInfo>,
    /// The state the user last asked for.
    pub requested_state: Intent,
    /// A shutdown was requested.
    pub shutting_down: bool,
}

/// The memory digest and what it cost.
#[derive(Clone, Debug, Serialize)]
pub struct DigestReport {
    /// Always "blake3".
    pub algorithm: &'static str,
    /// Hex digest of all guest RAM in address order.
    pub digest: String,
    /// Bytes hashed.
    pub bytes: u64,
    /// Time hashing.
    pub hash_ms: f64,
    /// How long the guest was paused for it (0 when it was paused already).
    pub pause_ms: f64,
    /// Hash throughput.
    pub gb_per_s: f64,
}

/// A vCPU's registers and what reading them cost.
#[derive(Clone, Debug, Serialize)]
pub struct RegsReport {
    /// The vCPU.
    pub vcpu: usize,
    /// Its registers.
    pub regs: ferry_image::CpuRegs,
    /// How long the guest was paused for it (0 when it was paused already).
    pub pause_ms: f64,
}

/// Why an operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another operation holds the VM.
    #[error("cannot start a {requested}: a {running} is in progress (for {elapsed_ms:.0} ms); try again when it ends")]
    Busy {
        /// What was asked for.
        requested: Operation,
        /// What holds the VM.
        running: Operation,
        /// How long it has been running.
        elapsed_ms: f64,
    },
    /// The VM has stopped.
    #[error("VM has stopped: cannot {0}")]
    Stopped(Operation),
    /// A shutdown was requested earlier.
    #[error("VM is shutting down: cannot start a {0}")]
    ShuttingDown(Operation),
    /// The guest was migrated away.
    #[error("VM has migrated to {to}: cannot start a {op}")]
    Migrated {
        /// What was asked for.
        op: Operation,
        /// Where the guest went.
        to: String,
    },
    /// No migration is running.
    #[error("no migration is running")]
    NothingToCancel,
    /// The migration has committed; the guest belongs to the destination.
    #[error("the migration has committed: the guest belongs to the destination now and cannot be called back")]
    AlreadyCommitted,
    /// No post-copy waits for a resume.
    #[error("no post-copy migration is paused: nothing to resume")]
    NothingToResume,
    /// A post-copy lost its link after the commit; it waits for a resume.
    #[error("{0}")]
    PostcopyPaused(String),
    /// `Go` was sent and no `Running` came back: the commit waits to be settled.
    #[error("{0}")]
    CommitUnconfirmed(String),
    /// The guest may run at the destination: nothing may run it here, or
    /// touch it, until the commit is settled.
    #[error("migration {migration_id} to {to} has an unconfirmed commit (the destination may run the guest): cannot {op} here; settle it with `ferry migrate --resume` or `ferry migrate --take-back`")]
    CommitInDoubt {
        /// What was asked for.
        op: Operation,
        /// The migration.
        migration_id: String,
        /// Its destination.
        to: String,
    },
    /// Only a commit in doubt can be taken back.
    #[error("{0}")]
    CannotTakeBack(String),
    /// A migration was refused or failed; the guest runs here as before.
    #[error("migration failed, the guest stays here: {0}")]
    Migration(#[from] MigrationError),
    /// A snapshot was refused or failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The vCPU asked for does not exist.
    #[error("vCPU {index} does not exist: the VM has {count} vCPU(s)")]
    NoSuchVcpu {
        /// Index asked for.
        index: usize,
        /// vCPUs of the VM.
        count: usize,
    },
    /// The VMM failed.
    #[error("{op} failed: {source}")]
    Vm {
        /// What was attempted.
        op: Operation,
        /// The VM's error.
        source: ferry_vmm::Error,
    },
}

/// Whose fault an error is: the API's 400, 409, 500 or 502.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The request is wrong.
    Client,
    /// The request is fine but the VM's state does not allow it now.
    Conflict,
    /// The VMM failed.
    Vmm,
    /// The peer failed, refused or could not be reached (a migration's destination).
    Peer,
}

impl ControlError {
    /// Classifies the error.
    pub fn fault(&self) -> Fault {
        match self {
            ControlError::Busy { .. }
            | ControlError::Stopped(_)
            | ControlError::ShuttingDown(_)
            | ControlError::Migrated { .. }
            | ControlError::NothingToCancel
            | ControlError::NothingToResume
            | ControlError::CommitInDoubt { .. }
            | ControlError::CannotTakeBack(_)
            | ControlError::AlreadyCommitted => Fault::Conflict,
            ControlError::NoSuchVcpu { .. } => Fault::Client,
            ControlError::PostcopyPaused(_) | ControlError::CommitUnconfirmed(_) => Fault::Peer,
            ControlError::Migration(m) if m.is_cancelled() => Fault::Conflict,
            ControlError::Migration(m) if m.is_client_error() => Fault::Client,
            ControlError::Migration(MigrationError::Engine(crate::Error::NotConverging { .. })) => Fault::Conflict,
            // The link or the peer's frames failed under the engine: the peer's side.
            ControlError::Migration(MigrationError::Engine(crate::Error::Wire(_))) => Fault::Peer,
            ControlError::Migration(MigrationError::Engine(_)) => Fault::Vmm,
            ControlError::Migration(_) => Fault::Peer,
            ControlError::Snapshot(SnapshotError::Invalid(_)) => Fault::Client,
            ControlError::Snapshot(SnapshotError::Conflict(_)) => Fault::Conflict,
            ControlError::Snapshot(SnapshotError::Failed(_)) => Fault::Vmm,
            ControlError::Vm { source: ferry_vmm::Error::WrongState { .. }, .. } => Fault::Conflict,
            ControlError::Vm { .. } => Fault::Vmm,
        }
    }

    /// The operation that holds the VM, for a `Busy` error.
    pub fn running(&self) -> Option<Operation> {
        match self {
            ControlError::Busy { running, .. } => Some(*running),
            _ => None,
        }
    }
}

struct Ops {
    current: Option<(Operation, Instant)>,
    intent: Intent,
    shutting_down: bool,
    /// Where the guest went, once a migration committed.
    migrated_to: Option<String>,
    /// A commit in doubt: (migration id, destination).
    in_doubt: Option<(String, String)>,
}

/// A VM and everything that decides what may happen to it next.
pub struct VmController {
    vm: Arc<Vm>,
    /// Root hash of the newest image this VM's memory matches (its last
    /// snapshot, or the image it was restored from), while the dirty log
    /// has tracked every write since. `None`: no incremental snapshot possible.
    lineage: Mutex<Option<Hash32>>,
    /// For a lazily restored VM: done once every page is in place.
    memory_ready: Option<LazyCompletion>,
    ops: Mutex<Ops>,
    cv: Condvar,
    /// The VM's identity, kept across migrations.
    vm_id: String,
    /// The last (or running) migration.
    migration: ProgressHandle,
    /// A post-copy whose link was lost, kept for a resume.
    postcopy_resume: Mutex<Option<PostcopyResume>>,
}

/// Holds the VM for one operation; on drop, brings the VM to the user's
/// requested state and lets the next operation in.
struct Turn<'a> {
    ctl: &'a VmController,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut ops = self.ctl.ops.lock().unwrap();
        if !ops.shutting_down && ops.migrated_to.is_none() {
            self.ctl.apply(ops.intent);
        }
        ops.current = None;
        self.ctl.cv.notify_all();
    }
}

impl VmController {
    /// Wraps a VM. The requested state starts as the VM's own.
    pub fn new(vm: Arc<Vm>, lineage: Option<Hash32>, memory_ready: Option<LazyCompletion>) -> Self {
        Self::with_id(vm, lineage, memory_ready, crate::migration::new_vm_id())
    }

    /// Wraps a VM that already has an identity (one that migrated in).
    pub fn with_id(vm: Arc<Vm>, lineage: Option<Hash32>, memory_ready: Option<LazyCompletion>, vm_id: String) -> Self {
        let intent = if vm.is_paused() { Intent::Paused } else { Intent::Running };
        VmController {
            vm,
            lineage: Mutex::new(lineage),
            memory_ready,
            ops: Mutex::new(Ops { current: None, intent, shutting_down: false, migrated_to: None, in_doubt: None }),
            cv: Condvar::new(),
            vm_id,
            migration: Arc::new(Mutex::new(MigrationProgress::default())),
            postcopy_resume: Mutex::new(None),
        }
    }

    /// The VM's identity.
    pub fn vm_id(&self) -> &str {
        &self.vm_id
    }

    /// Moves the guest to another host. On success the guest runs there and
    /// this VM ends (or stays paused with `keep_paused`); on failure it runs
    /// here in the state the user asked for.
    pub fn migrate(&self, req: &MigrateRequest) -> Result<MigrationStats, ControlError> {
        let op = Operation::Migration;
        let turn = self.begin(self.ops.lock().unwrap(), op)?;
        if let Some(ready) = &self.memory_ready {
            if !ready.wait(crate::snapshot::LAZY_WAIT) {
                return Err(ControlError::Snapshot(SnapshotError::Conflict(
                    "guest memory is still being restored lazily; migrate later".into(),
                )));
            }
        }
        let started = Instant::now();
        *self.migration.lock().unwrap() = MigrationProgress::default();
        let mut resume = None;
        let r = migrate_out(&self.vm, &self.vm_id, req, &self.migration, &mut resume);
        self.finish_migration(started, req, r, resume, turn)
    }

    /// Records how a migration (or a resumed post-copy) ended and what it
    /// means for the VM here.
    fn finish_migration(
        &self,
        started: Instant,
        req: &MigrateRequest,
        r: Result<MigrationStats, MigrationError>,
        resume: Option<PostcopyResume>,
        turn: Turn<'_>,
    ) -> Result<MigrationStats, ControlError> {
        if let Err(e) = &r {
            if e.is_commit_unconfirmed() {
                // Go was sent: the guest may run there. Keep it paused here,
                // with all of its state, until a settle says who has it.
                let id = resume.as_ref().map(|c| c.migration_id.clone()).unwrap_or_default();
                let so_far = resume.as_ref().map(|c| c.stats.clone());
                {
                    let mut ops = self.ops.lock().unwrap();
                    ops.migrated_to = Some(req.to.clone());
                    ops.in_doubt = Some((id, req.to.clone()));
                }
                if let Some(ctx) = resume {
                    *self.postcopy_resume.lock().unwrap() = Some(ctx);
                }
                let mut p = self.migration.lock().unwrap();
                p.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
                p.state = Some(MigrationState::CommitUnconfirmed);
                p.error = Some(e.to_string());
                p.result = so_far;
                p.link = None;
                drop(p);
                drop(turn);
                return Err(ControlError::CommitUnconfirmed(e.to_string()));
            }
            if e.is_postcopy_paused() {
                // The guest is the destination's now, but part of its memory
                // is only here: keep it paused (never resumed here) for a resume.
                self.ops.lock().unwrap().migrated_to = Some(req.to.clone());
                if let Some(ctx) = resume {
                    *self.postcopy_resume.lock().unwrap() = Some(ctx);
                }
                let mut p = self.migration.lock().unwrap();
                p.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
                p.state = Some(MigrationState::PostcopyPaused);
                p.error = Some(e.to_string());
                drop(p);
                drop(turn);
                return Err(ControlError::PostcopyPaused(e.to_string()));
            }
        }
        // A cancel cuts the link, so the migration may fail with the cut
        // rather than at its next frame: it was still the user's cancel.
        let r = match r {
            Err(e)
                if !e.is_cancelled() && {
                    let p = self.migration.lock().unwrap();
                    p.cancel_requested && !p.committed
                } =>
            {
                Err(MigrationError::Engine(crate::Error::Cancelled))
            }
            r => r,
        };
        {
            let mut p = self.migration.lock().unwrap();
            p.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
            p.link = None;
            match &r {
                Ok(s) => {
                    p.state = Some(MigrationState::Completed);
                    p.result = Some(s.clone());
                }
                Err(e) => {
                    p.state = Some(if e.is_cancelled() { MigrationState::Cancelled } else { MigrationState::Failed });
                    p.error = Some(e.to_string());
                }
            }
        }
        match r {
            Ok(stats) => {
                {
                    let mut ops = self.ops.lock().unwrap();
                    ops.migrated_to = Some(req.to.clone());
                    ops.in_doubt = None;
                }
                drop(turn);
                if !req.keep_paused {
                    self.vm.stop(ferry_vmm::ExitReason::Migrated { to: req.to.clone() });
                }
                Ok(stats)
            }
            Err(e) => {
                drop(turn);
                Err(e.into())
            }
        }
    }

    /// Finishes a post-copy whose link was lost, or settles a commit in
    /// doubt in the destination's favour, over a new connection (and then,
    /// in post-copy and hybrid, pushes the pages the destination lacks).
    pub fn resume_migration(&self) -> Result<MigrationStats, ControlError> {
        let ctx = self.postcopy_resume.lock().unwrap().take().ok_or(ControlError::NothingToResume)?;
        if ctx.pending == Unsettled::Commit {
            return self.settle(ctx, SettleWant::Destination, false);
        }
        let (turn, started, mut ctx) = self.resume_turn(ctx)?;
        let req = ctx.request.clone();
        let r = resume_postcopy(&self.vm, &self.vm_id, &mut ctx, &self.migration);
        let keep = r.as_ref().err().is_some_and(|e| e.is_postcopy_paused()).then_some(ctx);
        self.finish_migration(started, &req, r, keep, turn)
    }

    /// Takes the VM's operation slot for a resume or settle of `ctx`, and
    /// clears the last migration's outcome; when the VM is busy, `ctx` stays
    /// pending (taken back out of `ctx`) so that a later call can try again.
    fn resume_turn(&self, ctx: PostcopyResume) -> Result<(Turn<'_>, Instant, PostcopyResume), ControlError> {
        let mut ops = self.ops.lock().unwrap();
        if let Some((running, since)) = ops.current {
            *self.postcopy_resume.lock().unwrap() = Some(ctx);
            return Err(ControlError::Busy {
                requested: Operation::Migration,
                running,
                elapsed_ms: since.elapsed().as_secs_f64() * 1e3,
            });
        }
        ops.current = Some((Operation::Migration, Instant::now()));
        drop(ops);
        let mut p = self.migration.lock().unwrap();
        p.error = None;
        p.result = None;
        Ok((Turn { ctl: self }, Instant::now(), ctx))
    }

    /// Settles a commit in doubt in this side's favour: the destination is
    /// told to drop its copy, which it does only if it never got `Go`, and
    /// the guest runs here again (if it did get `Go`, the migration
    /// completes instead: in post-copy and hybrid by pushing the pages the
    /// destination lacks). `force` skips asking: only for a destination
    /// known to be gone without having run the guest (it exited saying so).
    pub fn take_back_migration(&self, force: bool) -> Result<MigrationStats, ControlError> {
        let ctx = self.postcopy_resume.lock().unwrap().take().ok_or(ControlError::NothingToResume)?;
        if ctx.pending != Unsettled::Commit {
            *self.postcopy_resume.lock().unwrap() = Some(ctx);
            return Err(ControlError::CannotTakeBack(
                "a paused post-copy cannot be taken back: the guest runs at the destination; finish it with `ferry migrate --resume`".into(),
            ));
        }
        self.settle(ctx, SettleWant::TakeBack, force)
    }

    /// Settles a commit in doubt (see [`VmController::resume_migration`]
    /// and [`VmController::take_back_migration`]).
    fn settle(&self, ctx: PostcopyResume, want: SettleWant, force: bool) -> Result<MigrationStats, ControlError> {
        let (turn, started, mut ctx) = self.resume_turn(ctx)?;
        let req = ctx.request.clone();
        let r = if force {
            ctx.stats.state = MigrationState::Cancelled;
            self.migration.lock().unwrap().state = Some(MigrationState::Cancelled);
            Ok(Settled::TakenBack(ctx.stats.clone()))
        } else {
            settle_commit(&self.vm_id, &mut ctx, &self.migration, want)
        };
        match r {
            Ok(Settled::Running(_)) if ctx.is_postcopy() => {
                // Settled: the guest is the destination's. Its missing pages
                // are only here; the ordinary post-copy resume pushes them
                // (and a failure of it leaves the post-copy paused, not the
                // commit in doubt).
                self.ops.lock().unwrap().in_doubt = None;
                ctx.pending = Unsettled::Postcopy;
                let r = resume_postcopy(&self.vm, &self.vm_id, &mut ctx, &self.migration);
                let keep = r.as_ref().err().is_some_and(|e| e.is_postcopy_paused()).then_some(ctx);
                self.finish_migration(started, &req, r, keep, turn)
            }
            Ok(Settled::Running(stats)) => self.finish_migration(started, &req, Ok(stats), None, turn),
            Ok(Settled::TakenBack(stats)) => {
                {
                    // The guest is this side's again: the turn's end resumes
                    // it if the user wants it running.
                    let mut ops = self.ops.lock().unwrap();
                    ops.migrated_to = None;
                    ops.in_doubt = None;
                }
                let mut p = self.migration.lock().unwrap();
                p.elapsed_ms += started.elapsed().as_secs_f64() * 1e3;
                p.state = Some(MigrationState::Cancelled);
                p.result = Some(stats.clone());
                p.committed = false;
                drop(p);
                drop(turn);
                Ok(stats)
            }
            Err(e) => {
                let msg = e.to_string();
                let mut p = self.migration.lock().unwrap();
                p.state = Some(MigrationState::CommitUnconfirmed);
                p.error = Some(msg.clone());
                p.result = Some(ctx.stats.clone());
                *self.postcopy_resume.lock().unwrap() = Some(ctx);
                drop(p);
                drop(turn);
                Err(ControlError::CommitUnconfirmed(msg))
            }
        }
    }

    /// Cancels the running migration: it stops at its next frame and the
    /// guest keeps running here. Refused once the source has committed.
    pub fn cancel_migration(&self) -> Result<(), ControlError> {
        let running = matches!(self.ops.lock().unwrap().current, Some((Operation::Migration, _)));
        let mut p = self.migration.lock().unwrap();
        if !running || p.result.is_some() || p.error.is_some() {
            return Err(ControlError::NothingToCancel);
        }
        if p.committed {
            return Err(ControlError::AlreadyCommitted);
        }
        p.cancel_requested = true;
        // Whatever the migration waits for (a stalled peer's Accept or
        // Ready, a full socket) ends now, not at the peer timeout.
        if let Some(link) = &p.link {
            link.cut();
        }
        Ok(())
    }

    /// The running or last migration's progress.
    pub fn migration_progress(&self) -> MigrationProgress {
        let mut p = self.migration.lock().unwrap().clone();
        if p.result.is_none() && p.error.is_none() {
            if let Some((Operation::Migration, since)) = self.ops.lock().unwrap().current {
                p.elapsed_ms = since.elapsed().as_secs_f64() * 1e3;
            }
        }
        p
    }

    /// The VM (for status questions and the console, which need no turn).
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// Brings the vCPUs to `intent`; errors (a VM that stopped) are ignored
    /// because the VM's own state then says what happened.
    fn apply(&self, intent: Intent) {
        let _ = match intent {
            Intent::Paused => self.vm.pause(),
            Intent::Running => self.vm.resume(),
        };
    }

    fn stopped(&self) -> bool {
        self.vm.status().state == RunState::Stopped
    }

    /// Waits for the VM to be free and takes it for `op`.
    fn begin<'a>(&'a self, mut ops: MutexGuard<'a, Ops>, op: Operation) -> Result<Turn<'a>, ControlError> {
        let deadline = Instant::now() + SHORT_WAIT;
        loop {
            if self.stopped() {
                return Err(ControlError::Stopped(op));
            }
            if ops.shutting_down {
                return Err(ControlError::ShuttingDown(op));
            }
            if let Some((migration_id, to)) = &ops.in_doubt {
                return Err(ControlError::CommitInDoubt { op, migration_id: migration_id.clone(), to: to.clone() });
            }
            if let Some(to) = &ops.migrated_to {
                return Err(ControlError::Migrated { op, to: to.clone() });
            }
            match ops.current {
                None => {
                    ops.current = Some((op, Instant::now()));
                    return Ok(Turn { ctl: self });
                }
                Some((running, since)) => {
                    let now = Instant::now();
                    if !running.is_short() || now >= deadline {
                        return Err(ControlError::Busy {
                            requested: op,
                            running,
                            elapsed_ms: now.duration_since(since).as_secs_f64() * 1e3,
                        });
                    }
                    ops = self.cv.wait_timeout(ops, deadline - now).unwrap().0;
                }
            }
        }
    }

    fn set_intent(&self, intent: Intent, op: Operation) -> Result<Applied, ControlError> {
        let mut ops = self.ops.lock().unwrap();
        if let Some((Operation::Snapshot, _)) = ops.current {
            if self.stopped() {
                return Err(ControlError::Stopped(op));
            }
            ops.intent = intent;
            return Ok(Applied::Deferred { until: Operation::Snapshot });
        }
        let turn = self.begin(ops, op)?;
        self.ops.lock().unwrap().intent = intent;
        let r = match intent {
            Intent::Paused => self.vm.pause(),
            Intent::Running => self.vm.resume(),
        };
        drop(turn);
        r.map_err(|source| ControlError::Vm { op, source })?;
        Ok(Applied::Now)
    }

    /// Pauses the guest (or, during a snapshot, records that it should be
    /// paused when the snapshot ends).
    pub fn pause(&self) -> Result<Applied, ControlError> {
        self.set_intent(Intent::Paused, Operation::Pause)
    }

    /// Resumes the guest (or records it, as [`VmController::pause`]).
    pub fn resume(&self) -> Result<Applied, ControlError> {
        self.set_intent(Intent::Running, Operation::Resume)
    }

    /// BLAKE3 of guest RAM, taken while paused; the guest runs again
    /// afterwards unless the user had paused it.
    pub fn memory_digest(&self) -> Result<DigestReport, ControlError> {
        let op = Operation::Digest;
        let turn = self.begin(self.ops.lock().unwrap(), op)?;
        let was_paused = self.vm.is_paused();
        let t0 = Instant::now();
        self.vm.pause().map_err(|source| ControlError::Vm { op, source })?;
        let t1 = Instant::now();
        let digest = self.vm.memory_digest().map_err(|source| ControlError::Vm { op, source })?;
        let hash_time = t1.elapsed();
        drop(turn);
        let bytes = self.vm.ram().size();
        Ok(DigestReport {
            algorithm: "blake3",
            digest: digest.to_hex().to_string(),
            bytes,
            hash_ms: hash_time.as_secs_f64() * 1e3,
            pause_ms: if was_paused { 0.0 } else { t0.elapsed().as_secs_f64() * 1e3 },
            gb_per_s: bytes as f64 / hash_time.as_secs_f64().max(1e-9) / 1e9,
        })
    }

    /// One vCPU's registers (for its page tables: CR3, CR4, EFER), read
    /// during a pause as short as a snapshot's: the guest runs again at once
    /// unless the user had paused it. Waits its turn like a digest.
    pub fn vcpu_regs(&self, index: usize) -> Result<RegsReport, ControlError> {
        let op = Operation::Registers;
        let count = self.vm.status().vcpus as usize;
        if index >= count {
            return Err(ControlError::NoSuchVcpu { index, count });
        }
        let turn = self.begin(self.ops.lock().unwrap(), op)?;
        let was_paused = self.vm.is_paused();
        let t0 = Instant::now();
        self.vm.pause().map_err(|source| ControlError::Vm { op, source })?;
        let state = self.vm.save_state();
        drop(turn);
        let pause_ms = if was_paused { 0.0 } else { t0.elapsed().as_secs_f64() * 1e3 };
        let state = state.map_err(|source| ControlError::Vm { op, source })?;
        let v = state.vcpus.get(index).ok_or(ControlError::NoSuchVcpu { index, count: state.vcpus.len() })?;
        Ok(RegsReport { vcpu: index, regs: crate::regs::cpu_regs(v), pause_ms })
    }

    /// Takes a snapshot; pause and resume requests meanwhile are applied when it ends.
    pub fn snapshot(&self, req: &SnapshotRequest) -> Result<SnapshotStats, ControlError> {
        req.validate()?;
        let _turn = self.begin(self.ops.lock().unwrap(), Operation::Snapshot)?;
        let mut lineage = self.lineage.lock().unwrap();
        Ok(take_snapshot(&self.vm, &mut lineage, self.memory_ready.as_ref(), req)?)
    }

    /// Asks the guest to shut down (Ctrl-Alt-Del), stopping it after `timeout`.
    /// Nothing but status questions is served afterwards.
    pub fn shutdown(&self, timeout: Duration) -> Result<(), ControlError> {
        let op = Operation::Shutdown;
        let turn = self.begin(self.ops.lock().unwrap(), op)?;
        self.ops.lock().unwrap().shutting_down = true;
        let r = self.vm.request_shutdown(timeout);
        drop(turn);
        r.map_err(|source| ControlError::Vm { op, source })
    }

    /// Like [`VmController::shutdown`], for a signal: waits up to `wait` for
    /// a running operation (a snapshot, say) to end first, so that it is not
    /// cut off halfway. Returns false if the VM had stopped or was shutting down.
    pub fn shutdown_when_free(&self, timeout: Duration, wait: Duration) -> bool {
        let _ = self.wait_idle(wait);
        match self.shutdown(timeout) {
            Ok(()) => true,
            Err(ControlError::Busy { .. }) => {
                // Still held past `wait`: stop the guest anyway; the operation
                // fails cleanly when its next pause finds the VM stopped.
                self.ops.lock().unwrap().shutting_down = true;
                self.vm.request_shutdown(timeout).is_ok()
            }
            Err(_) => false,
        }
    }

    /// Waits until no operation holds the VM; false on timeout.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut ops = self.ops.lock().unwrap();
        while ops.current.is_some() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            ops = self.cv.wait_timeout(ops, deadline - now).unwrap().0;
        }
        true
    }

    /// The operation in progress and the requested state.
    pub fn status(&self) -> ControlStatus {
        let ops = self.ops.lock().unwrap();
        ControlStatus {
            operation: ops
                .current
                .map(|(kind, since)| OperationInfo { kind, elapsed_ms: since.elapsed().as_secs_f64() * 1e3 }),
            requested_state: ops.intent,
            shutting_down: ops.shutting_down,
        }
    }
}
