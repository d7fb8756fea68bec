//! Taking over a running exec (`POST /v1/attach?exec=ID`, [`serve`]): the host hands the exec a
//! new request stream, whose body is the exec's stdin from then on and whose response is its output
//! again (`Started`, output, `Exit`).
//!
//! Only an exec started `attachable` can be taken over (the host's code interpreter is one). What
//! it is for: when such an exec's host goes (its session ends: a restarted daemon; or the VM was
//! saved with it running and restored: a paused sandbox resumed, a fork's child), the exec is not
//! killed (nor, restored, run on detached with its output discarded) but *parked*: nothing reads
//! its pipes (a command that prints blocks once they are full; nothing is lost or buffered by the
//! agent) until a host attaches, or [`PARK_GRACE`] passes and it is killed like any exec whose host
//! is gone. Its stdin stays open meanwhile. A host finds it with `GET /v1/execs` (its label, and
//! whether it is parked). Output the old host had not received when it went is lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use hearth_proto::{AgentError, ErrorKind};
use tokio::sync::mpsc;

use crate::session::ExecFate;
use crate::{server, Agent};

/// How long a parked exec waits for a new host to attach before it is killed. The host attaches
/// right after a resume or a fork; a host that never does (a daemon restarted while the sandbox
/// was paused has forgotten the exec) leaves it to this.
pub const PARK_GRACE: Duration = Duration::from_secs(60);

/// A new host's request stream for an exec, and the session it came on.
pub struct Attach {
    pub fate: ExecFate,
    pub body: RecvStream,
    pub respond: SendResponse<Bytes>,
}

/// Where an attachable exec's supervisor receives its takeovers, and says whether it is parked.
pub struct Attachments {
    pub(super) takeovers: mpsc::Receiver<Attach>,
    parked: Arc<AtomicBool>,
}

impl Attachments {
    pub(super) fn set_parked(&self, parked: bool) {
        self.parked.store(parked, Ordering::Relaxed);
    }
}

/// The registry's end of an attachable exec's [`Attachments`].
pub(super) struct Handover {
    pub(super) sender: mpsc::Sender<Attach>,
    parked: Arc<AtomicBool>,
}

impl Handover {
    pub(super) fn parked(&self) -> bool {
        self.parked.load(Ordering::Relaxed)
    }
}

/// A takeover channel for [`crate::exec::ExecRegistry::make_attachable`]: one takeover waits at a
/// time.
pub(super) fn channel() -> (Handover, Attachments) {
    let (sender, takeovers) = mpsc::channel(1);
    let parked = Arc::new(AtomicBool::new(false));
    let handover = Handover {
        sender,
        parked: parked.clone(),
    };
    (handover, Attachments { takeovers, parked })
}

/// Hands the stream to exec `id`'s supervisor, or answers why not: it is not running, was not
/// started attachable (404), or another takeover is waiting (409).
pub fn serve(
    agent: &Agent,
    fate: ExecFate,
    id: u64,
    body: RecvStream,
    respond: SendResponse<Bytes>,
) {
    let Some(sender) = agent.execs.attachments(id) else {
        let error = AgentError::new(
            ErrorKind::NotFound,
            format!("exec {id} is not running or was not started attachable"),
        );
        return server::respond_error(respond, &error);
    };
    let attach = Attach {
        fate,
        body,
        respond,
    };
    if let Err(e) = sender.try_send(attach) {
        let (attach, why) = match e {
            mpsc::error::TrySendError::Full(attach) => (attach, "another attach is waiting"),
            mpsc::error::TrySendError::Closed(attach) => (attach, "it has just ended"),
        };
        let error = AgentError::new(
            ErrorKind::AlreadyExists,
            format!("exec {id} cannot be attached: {why}"),
        );
        server::respond_error(attach.respond, &error);
    }
}
