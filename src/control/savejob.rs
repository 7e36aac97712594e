//! The control thread's part of a live snapshot, as a state machine.
//!
//! The save job on its iothread (`snapshot::save`) writes RAM and says when
//! it wants the final pause and when it is done with it. What the control
//! thread then does — stop the vCPUs, quiesce the disks, take the disks'
//! reflinks, switch the run state, and later resume in the reverse order
//! with the state captured — is decided here and returned as [`Effect`]s
//! that the controller carries out in order. An effect that fails is
//! reported back ([`SaveJob::failed`]), and the job answers with the undo
//! of exactly what had been done. The decisions have no KVM in them, so
//! every order and every undo is unit-tested below.

use std::time::Instant;

use super::RunState;

/// Where the final pause stands.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) enum Phase {
    /// No pause: no snapshot, or one whose RAM passes run beside the guest.
    #[default]
    Live,
    /// The final pause, entered at `since`: the vCPUs are out (stopped by
    /// the snapshot if `resume_vcpus`), the disks quiesced, the run state
    /// `finish-migrate`; `resume_to` is the run state to go back to.
    Paused { resume_to: RunState, resume_vcpus: bool, since: Instant },
}

/// One thing for the control thread to do.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Effect {
    PauseVcpus,
    /// The disks' iothreads finish what is in flight and take nothing new.
    QuiesceDisks,
    /// `"disks": "clone"`: reflink every disk beside the state file.
    CloneDisks,
    ResumeDisks,
    ResumeVcpus,
    SetRunState(RunState),
    /// Tell the save job the vCPUs are out: its last pass.
    FinalPhase,
    /// The pause's length, for `query-savevm`'s downtime.
    RecordDowntime {
        ms: f64,
    },
    /// Guest events held back during the pause (reset, triple fault, I/O
    /// error) are handled now.
    ReplayDeferred,
    /// Hand the captured vCPU and device state to the save job: it writes
    /// it and closes the file.
    Close(Vec<u8>),
    /// Fail the snapshot with this reason (the guest keeps running).
    Cancel(String),
}

/// The control side of one snapshot's final pause.
#[derive(Default)]
pub(super) struct SaveJob {
    phase: Phase,
}

impl SaveJob {
    #[cfg(test)]
    fn phase(&self) -> Phase {
        self.phase
    }

    pub(super) fn is_paused(&self) -> bool {
        matches!(self.phase, Phase::Paused { .. })
    }

    /// The save job asks for the final pause; the VM is in `run`. The
    /// downtime counts from `now`, as QEMU counts it from vm_stop: the
    /// vCPUs' way out of KVM_RUN and the disks' quiesce are part of it.
    pub(super) fn pause(&mut self, run: RunState, now: Instant, clone_disks: bool) -> Vec<Effect> {
        if self.is_paused() {
            return Vec::new();
        }
        let running = run == RunState::Running;
        self.phase = Phase::Paused { resume_to: run, resume_vcpus: running, since: now };
        let mut e = Vec::new();
        if running {
            e.push(Effect::PauseVcpus);
        }
        e.push(Effect::QuiesceDisks);
        if clone_disks {
            e.push(Effect::CloneDisks);
        }
        e.extend([Effect::SetRunState(RunState::FinishMigrate), Effect::FinalPhase]);
        e
    }

    /// `effect`, from [`SaveJob::pause`], failed with `why`: the undo of
    /// what was done before it, and the snapshot's failure.
    pub(super) fn failed(&mut self, effect: &Effect, why: &str) -> Vec<Effect> {
        let Phase::Paused { resume_vcpus, .. } = self.phase else { return vec![Effect::Cancel(why.to_string())] };
        self.phase = Phase::Live;
        let (undo, reason) = match effect {
            Effect::PauseVcpus => (vec![], format!("cannot pause the vCPUs: {why}")),
            Effect::QuiesceDisks => (vec![], format!("cannot quiesce the disks: {why}")),
            Effect::CloneDisks => (vec![Effect::ResumeDisks], format!("disks=clone: {why}")),
            other => (vec![Effect::ResumeDisks], format!("{other:?}: {why}")),
        };
        let mut e = undo;
        if resume_vcpus && *effect != Effect::PauseVcpus {
            e.push(Effect::ResumeVcpus);
        }
        e.push(Effect::Cancel(reason));
        e
    }

    /// The save job is done with the pause. `captured`: the vCPU and
    /// device state, taken while everything was still out (None when the
    /// snapshot failed or was cancelled meanwhile).
    pub(super) fn resume(&mut self, captured: Option<Result<Vec<u8>, String>>, now: Instant) -> Vec<Effect> {
        let Phase::Paused { resume_to, resume_vcpus, since } = self.phase else { return Vec::new() };
        self.phase = Phase::Live;
        let mut e = vec![Effect::ResumeDisks];
        if resume_vcpus {
            e.push(Effect::ResumeVcpus);
        }
        e.extend([Effect::SetRunState(resume_to), Effect::RecordDowntime { ms: now.duration_since(since).as_secs_f64() * 1e3 }, Effect::ReplayDeferred]);
        match captured {
            Some(Ok(state)) => e.push(Effect::Close(state)),
            Some(Err(why)) => e.push(Effect::Cancel(format!("cannot save vCPU/device state: {why}"))),
            None => {}
        }
        e
    }

    /// `stop` during the pause: the vCPUs stay stopped when it ends.
    /// True if that changed anything (a STOP event is due).
    pub(super) fn stop(&mut self) -> bool {
        match &mut self.phase {
            Phase::Paused { resume_to, resume_vcpus, .. } if *resume_to == RunState::Running => {
                *resume_to = RunState::Paused;
                *resume_vcpus = false;
                true
            }
            _ => false,
        }
    }

    /// `cont` during the pause: the vCPUs run when it ends. True if that
    /// changed anything (a RESUME event is due).
    pub(super) fn cont(&mut self) -> bool {
        match &mut self.phase {
            Phase::Paused { resume_to, resume_vcpus, .. } if matches!(resume_to, RunState::Paused | RunState::Prelaunch) => {
                *resume_to = RunState::Running;
                *resume_vcpus = true;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn cancel_reason(e: &[Effect]) -> &str {
        match e.last() {
            Some(Effect::Cancel(r)) => r,
            other => panic!("no cancel at the end: {other:?}"),
        }
    }

    #[test]
    fn a_running_guest_is_paused_in_order_and_resumed_in_reverse() {
        let mut j = SaveJob::default();
        let t0 = Instant::now();
        assert_eq!(
            j.pause(RunState::Running, t0, true),
            [Effect::PauseVcpus, Effect::QuiesceDisks, Effect::CloneDisks, Effect::SetRunState(RunState::FinishMigrate), Effect::FinalPhase]
        );
        assert!(j.is_paused());
        assert!(j.pause(RunState::FinishMigrate, t0, true).is_empty(), "a second request while paused does nothing");
        let e = j.resume(Some(Ok(b"{}".to_vec())), t0 + Duration::from_millis(7));
        assert_eq!(e[..3], [Effect::ResumeDisks, Effect::ResumeVcpus, Effect::SetRunState(RunState::Running)]);
        assert!(matches!(e[3], Effect::RecordDowntime { ms } if (ms - 7.0).abs() < 1e-6), "{e:?}");
        assert_eq!(e[4..], [Effect::ReplayDeferred, Effect::Close(b"{}".to_vec())]);
        assert_eq!(j.phase(), Phase::Live);
        assert!(j.resume(None, t0).is_empty(), "no pause, nothing to resume");
    }

    #[test]
    fn a_paused_guest_stays_paused_and_its_vcpus_are_left_alone() {
        let mut j = SaveJob::default();
        let t0 = Instant::now();
        assert_eq!(j.pause(RunState::Paused, t0, false), [Effect::QuiesceDisks, Effect::SetRunState(RunState::FinishMigrate), Effect::FinalPhase]);
        let e = j.resume(None, t0);
        assert!(!e.contains(&Effect::ResumeVcpus), "{e:?}");
        assert!(e.contains(&Effect::SetRunState(RunState::Paused)), "{e:?}");
        assert!(!e.iter().any(|x| matches!(x, Effect::Close(_) | Effect::Cancel(_))), "a failed snapshot closes nothing: {e:?}");
    }

    #[test]
    fn each_failure_undoes_exactly_what_was_done() {
        let t0 = Instant::now();
        let mut j = SaveJob::default();
        j.pause(RunState::Running, t0, true);
        let e = j.failed(&Effect::PauseVcpus, "EINTR");
        assert_eq!(e.len(), 1);
        assert_eq!(cancel_reason(&e), "cannot pause the vCPUs: EINTR");
        assert_eq!(j.phase(), Phase::Live);

        j.pause(RunState::Running, t0, true);
        let e = j.failed(&Effect::QuiesceDisks, "timed out");
        assert_eq!(e[..1], [Effect::ResumeVcpus]);
        assert_eq!(cancel_reason(&e), "cannot quiesce the disks: timed out");

        j.pause(RunState::Running, t0, true);
        let e = j.failed(&Effect::CloneDisks, "EOPNOTSUPP");
        assert_eq!(e[..2], [Effect::ResumeDisks, Effect::ResumeVcpus]);
        assert_eq!(cancel_reason(&e), "disks=clone: EOPNOTSUPP");

        // Paused by the user: a failure leaves the vCPUs stopped.
        j.pause(RunState::Paused, t0, true);
        let e = j.failed(&Effect::CloneDisks, "EOPNOTSUPP");
        assert_eq!(e[..1], [Effect::ResumeDisks]);
        assert!(!e.contains(&Effect::ResumeVcpus), "{e:?}");
    }

    #[test]
    fn a_capture_that_fails_cancels_after_the_guest_is_back() {
        let mut j = SaveJob::default();
        let t0 = Instant::now();
        j.pause(RunState::Running, t0, false);
        let e = j.resume(Some(Err("KVM_GET_LAPIC: EIO".into())), t0);
        assert!(e.contains(&Effect::ResumeVcpus));
        assert_eq!(cancel_reason(&e), "cannot save vCPU/device state: KVM_GET_LAPIC: EIO");
    }

    #[test]
    fn stop_and_cont_during_the_pause_decide_how_it_ends() {
        let mut j = SaveJob::default();
        let t0 = Instant::now();
        assert!(!j.stop() && !j.cont(), "outside a pause they are not the job's");
        j.pause(RunState::Running, t0, false);
        assert!(j.stop());
        assert!(!j.stop(), "a second stop changes nothing");
        let e = j.resume(None, t0);
        assert!(!e.contains(&Effect::ResumeVcpus) && e.contains(&Effect::SetRunState(RunState::Paused)), "{e:?}");
        j.pause(RunState::Paused, t0, false);
        assert!(j.cont());
        let e = j.resume(None, t0);
        assert!(e.contains(&Effect::ResumeVcpus) && e.contains(&Effect::SetRunState(RunState::Running)), "{e:?}");
    }
}
