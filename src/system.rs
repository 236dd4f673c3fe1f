//! What the operating system tells about this process, read from `/proc` (Linux): the server's
//! resident memory for the console, and a thread's disk writes for the mirror's report.
//! Elsewhere, or where `/proc` says nothing, the answer is `None`. Also how the server's
//! threads are scheduled, and its open-file limit: raised at start, and checked against
//! `--max-connections`.

use std::fs;
use std::io;

/// How the server's threads are scheduled (Linux; elsewhere they run as the system decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheduling {
    /// `SCHED_BATCH`: a thread that a client's bytes wake does not preempt the program that is
    /// running; it runs at the scheduler's next turn, often on the other core. A client that
    /// pipelines then goes on writing, and the server reads more per wake-up.
    Batch,
    /// The policy the server was started with (`SCHED_OTHER` unless `chrt` or the service
    /// manager chose another), left alone.
    Normal,
}

impl std::str::FromStr for Scheduling {
    type Err = String;

    fn from_str(text: &str) -> Result<Scheduling, String> {
        match text {
            "batch" => Ok(Scheduling::Batch),
            "normal" => Ok(Scheduling::Normal),
            _ => Err(format!("unknown scheduling {text:?}: use batch or normal")),
        }
    }
}

/// Schedules the calling thread, and every thread it starts from then on (they inherit it),
/// as `scheduling` says. `SCHED_BATCH` needs no privileges; `Normal` changes nothing.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn set_scheduling(scheduling: Scheduling) -> io::Result<()> {
    if scheduling == Scheduling::Normal {
        return Ok(());
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0 is this thread.
    let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Elsewhere (other systems, or musl, whose `sched_setscheduler` only says ENOSYS) the threads
/// run as the system decides.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn set_scheduling(_scheduling: Scheduling) -> io::Result<()> {
    Ok(())
}

/// Descriptors the server keeps for itself, besides one per client: the standard streams, the
/// listeners, two eventfds, the signal pipe, the SQLite file with its -wal and -shm (some
/// opened twice), a full copy's new file and its journal, the log file and up to 16 console
/// sessions. That is about 35; twice as many leaves room for what SQLite or a library opens
/// unforeseen (temporary files).
pub const RESERVED_DESCRIPTORS: u64 = 64;

/// What [`raise_open_file_limit`] did. A limit of `None` is unlimited.
#[derive(Debug)]
pub enum OpenFileLimit {
    /// Already at the hard limit: nothing to do.
    Kept(Option<u64>),
    Raised {
        from: u64,
        to: u64,
    },
    /// The raise was refused (a sandbox, say): the limit stays where it was.
    Failed {
        limit: u64,
        hard: u64,
        error: io::Error,
    },
}

impl OpenFileLimit {
    /// The soft limit now in force.
    pub fn limit(&self) -> Option<u64> {
        match self {
            OpenFileLimit::Kept(limit) => *limit,
            OpenFileLimit::Raised { to, .. } => Some(*to),
            OpenFileLimit::Failed { limit, .. } => Some(*limit),
        }
    }
}

/// Raises the soft open-file limit (`RLIMIT_NOFILE`) to the hard one, as nginx and Redis do.
/// The soft limit, often 1024, protects programs that use select(2), which cannot watch a
/// descriptor past 1023; this one never does, and needs one descriptor per client. The hard
/// limit is what the administrator allows (`LimitNOFILE=`, `ulimit -Hn`).
pub fn raise_open_file_limit() -> OpenFileLimit {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    match (limit.current, limit.maximum) {
        (Some(soft), Some(hard)) if soft < hard => {
            let raised = Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => OpenFileLimit::Raised {
                    from: soft,
                    to: hard,
                },
                Err(e) => OpenFileLimit::Failed {
                    limit: soft,
                    hard,
                    error: e.into(),
                },
            }
        }
        // No hard limit is never the case for descriptors on Linux (the kernel caps them at
        // fs.nr_open), and elsewhere "unlimited" may not be settable: left alone.
        (soft, _) => OpenFileLimit::Kept(soft),
    }
}

/// The warning to log at start when `max_connections` clients and the server's own
/// descriptors do not fit under the open-file `limit`; `None` when they do. The server still
/// starts: it keeps working at the limit, only clients past it wait to be accepted.
pub fn open_file_warning(max_connections: usize, limit: Option<u64>) -> Option<String> {
    let limit = limit?;
    let clients = u64::try_from(max_connections).unwrap_or(u64::MAX);
    let needed = clients.saturating_add(RESERVED_DESCRIPTORS);
    if needed <= limit {
        return None;
    }
    let lower = match limit.checked_sub(RESERVED_DESCRIPTORS) {
        Some(fits) if fits > 0 => format!("lower --max-connections to {fits} or less"),
        _ => "lower --max-connections".to_string(),
    };
    Some(format!(
        "--max-connections {max_connections} needs an open-file limit of {needed} \
         ({RESERVED_DESCRIPTORS} more for the server's own files), but the limit is {limit}: \
         clients past what fits wait unaccepted, and full mirror copies can fail. Raise the \
         hard limit (LimitNOFILE= in the systemd unit, NOFILE for the init script, ulimit -Hn \
         before starting) or {lower}"
    ))
}

/// The process's resident memory, in bytes.
pub fn resident_memory() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Bytes the calling thread has passed to `write(2)` and the like so far.
pub fn written_by_this_thread() -> Option<u64> {
    let io = fs::read_to_string("/proc/thread-self/io").ok()?;
    let line = io.lines().find(|l| l.starts_with("wchar:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn a_thread_and_those_it_starts_take_the_scheduling() {
        // SAFETY (each call below): no arguments; returns the calling thread's policy.
        #[allow(unsafe_code)]
        fn policy() -> i32 {
            unsafe { libc::sched_getscheduler(0) }
        }
        // In threads of their own: the policy stays with the thread that set it.
        let normal = std::thread::spawn(|| {
            set_scheduling(Scheduling::Normal).unwrap();
            policy()
        })
        .join()
        .unwrap();
        let batch = std::thread::spawn(|| {
            set_scheduling(Scheduling::Batch).expect("SCHED_BATCH needs no privileges");
            let child = std::thread::spawn(policy).join().unwrap();
            (policy(), child)
        })
        .join()
        .unwrap();
        assert_eq!(normal, libc::SCHED_OTHER, "normal leaves the default alone");
        assert_eq!(batch, (libc::SCHED_BATCH, libc::SCHED_BATCH));
        assert_eq!("batch".parse(), Ok(Scheduling::Batch));
        assert!("fifo".parse::<Scheduling>().is_err());
    }

    #[test]
    fn a_connection_limit_past_the_open_file_limit_is_warned_about() {
        // The usual default: 1024 clients and a soft limit of 1024.
        let warning = open_file_warning(1024, Some(1024)).expect("a warning");
        assert!(
            warning.contains("--max-connections 1024 needs an open-file limit of 1088")
                && warning.contains("the limit is 1024")
                && warning.contains("LimitNOFILE=")
                && warning.contains("lower --max-connections to 960 or less"),
            "{warning}"
        );
        let tiny = open_file_warning(1024, Some(40)).expect("a warning");
        assert!(tiny.ends_with("or lower --max-connections"), "{tiny}");
        assert_eq!(open_file_warning(960, Some(1024)), None, "fits exactly");
        assert_eq!(open_file_warning(1024, Some(524_288)), None);
        assert_eq!(open_file_warning(usize::MAX, None), None, "unlimited");
    }

    #[test]
    fn the_open_file_limit_ends_at_the_hard_limit() {
        use rustix::process::{getrlimit, Resource};
        // Idempotent, and the test binary is ours: raising it here harms nothing.
        let outcome = raise_open_file_limit();
        let after = getrlimit(Resource::Nofile);
        match outcome {
            OpenFileLimit::Failed { .. } => {}
            _ => assert_eq!(after.current, after.maximum, "{outcome:?}"),
        }
        assert_eq!(outcome.limit(), after.current);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn proc_tells_memory_and_writes() {
        assert!(resident_memory().is_some_and(|bytes| bytes > 0));
        let before = written_by_this_thread().expect("wchar in /proc/thread-self/io");
        let path = std::env::temp_dir().join(format!("phpmq-system-{}", std::process::id()));
        fs::write(&path, [0u8; 4096]).expect("write a temp file");
        let _ = fs::remove_file(&path);
        let after = written_by_this_thread().expect("wchar in /proc/thread-self/io");
        assert!(after >= before + 4096, "{before} then {after}");
    }
}
