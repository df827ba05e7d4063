//! The local pexi socket: pexi-guestd serves the pexi protocol on a Unix socket inside the guest and
//! relays every stream over its own single session with the PEP. A virtio-serial port has one opener;
//! through this socket any number of processes (the SDKs use it by default when it exists) share it.
//!
//! Each local connection runs the protocol's driver ([`pexi_protocol::io::drive`]) as a server; each
//! stream gets a relay task with its upstream call ([`pexi_guest::Client::call`]). Backpressure both ways
//! comes from the stream handles: the local client's bytes are taken (credit back) only as the upstream
//! takes them, and the PEP's bytes are read from the upstream call only while the local stream's send
//! buffer has room.

use pexi_guest::{Client, Error, RawEvent};
use pexi_protocol::io::{self, Handler, Inbound, Link, StreamIn, StreamOut};
use pexi_protocol::payload::{ErrorCode, ErrorPayload, Limits, MethodCall};
use pexi_protocol::session::{Config as SessionConfig, Event, Session};
use tokio::net::UnixStream;

/// The limits announced to local clients: no size caps of pexi-guestd's own and room for many streams (the
/// PEP's limits still apply to every request, as it enforces them); the protocol's default timeouts.
fn local_limits() -> Limits {
    Limits {
        max_concurrent_streams: 256,
        max_request_bytes: u64::MAX,
        max_response_bytes: u64::MAX,
        max_redirects: 20,
        ..Limits::default()
    }
}

/// Serves one local connection until it closes.
pub async fn serve(client: Client, socket: UnixStream) {
    let config = SessionConfig::new("pexi-guestd", env!("CARGO_PKG_VERSION"));
    let session = Session::server(config, local_limits());
    let mut local = Local { client };
    io::drive(
        socket,
        session,
        &mut local,
        None::<&mut tokio::sync::mpsc::UnboundedReceiver<()>>,
        &io::Options::default(),
    )
    .await;
}

/// The local side's handler: every stream a local client opens is relayed.
struct Local {
    client: Client,
}

impl Handler for Local {
    type Command = ();

    fn event(&mut self, link: &mut Link, event: Event) {
        if let Event::Opened { stream_id, call } = event {
            let (input, output) = link.attach(stream_id);
            tokio::spawn(relay(self.client.clone(), call, input, output));
        }
    }
}

/// One stream: the local client's call made upstream, and the bytes both ways.
async fn relay(client: Client, call: MethodCall, mut input: StreamIn, output: StreamOut) {
    let (mut upstream, mut sender) = match client.call(call).await {
        Ok(opened) => opened,
        Err(error) => {
            let _ = output.error(payload_of(error));
            return;
        }
    };
    let mut up_open = true;
    loop {
        tokio::select! {
            inbound = input.next() => match inbound {
                Inbound::Data(data) => {
                    if up_open && !matches!(sender.send(data).await, Ok(true)) {
                        up_open = false;
                    }
                }
                Inbound::End(_) => {
                    let _ = sender.finish();
                    up_open = false;
                }
                // The local stream is gone (CANCEL, ERROR, the connection closed): drop the call.
                Inbound::Failed { .. } => return,
                Inbound::Head(_) => {}
            },
            event = upstream.next() => match event {
                Ok(Some(RawEvent::Head(head))) => {
                    let _ = output.head(head);
                }
                Ok(Some(RawEvent::Data(data))) => {
                    // Waits for room for the local client before taking more from the PEP.
                    if output.data(data).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    let _ = output.end();
                    // Keep taking the local client's bytes until it ends too.
                    if up_open {
                        loop {
                            match input.next().await {
                                Inbound::Data(_) | Inbound::Head(_) => {}
                                Inbound::End(_) | Inbound::Failed { .. } => return,
                            }
                        }
                    }
                    return;
                }
                Err(error) => {
                    let _ = output.error(payload_of(error));
                    return;
                }
            },
        }
    }
}

fn payload_of(error: Error) -> ErrorPayload {
    match error {
        Error::Pep(payload) => payload,
        Error::Connect { .. } => {
            ErrorPayload::new(ErrorCode::Internal, error.to_string()).retryable(true)
        }
        other => ErrorPayload::new(ErrorCode::SessionReset, other.to_string()).retryable(true),
    }
}
