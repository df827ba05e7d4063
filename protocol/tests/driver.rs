//! The one tokio driver (`io::drive`) with two small handlers over an in-memory duplex: streams both ways,
//! the send buffer's bound on a peer that does not read, holds released only once written, and a keepalive
//! that finds a silent peer. Time is paused: a stall is seen as a wait that never ends, not as a duration.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pexi_protocol::io::{self, Ended, Handler, Inbound, Link, StreamIn, StreamOut};
use pexi_protocol::payload::{HttpRequest, HttpResponseHead, MethodCall, ResponseHead};
use pexi_protocol::session::{Event, Session, DEFAULT_STREAM_WINDOW, STREAM_SEND_BUFFER};
use tokio::sync::{mpsc, oneshot};

type Handles = (StreamIn, StreamOut);

type OpenCommand = (MethodCall, oneshot::Sender<Handles>);

/// The guest side: opens a stream per command once the session is established.
#[derive(Default)]
struct Opener(Vec<OpenCommand>);

impl Handler for Opener {
    type Command = OpenCommand;

    fn event(&mut self, _link: &mut Link, _event: Event) {}

    fn command(&mut self, _link: &mut Link, command: Self::Command) {
        self.0.push(command);
    }

    fn after(&mut self, link: &mut Link) {
        if link.session().is_established() {
            for (call, reply) in self.0.drain(..) {
                let id = link.session_mut().open(call).expect("open");
                let _ = reply.send(link.attach(id));
            }
        }
    }
}

/// The host side: hands each opened stream to the test.
struct Acceptor(mpsc::UnboundedSender<Handles>);

impl Handler for Acceptor {
    type Command = ();

    fn event(&mut self, link: &mut Link, event: Event) {
        if let Event::Opened { stream_id, .. } = event {
            let _ = self.0.send(link.attach(stream_id));
        }
    }
}

fn head() -> ResponseHead {
    ResponseHead::Http(HttpResponseHead {
        status: 200,
        headers: vec![],
        final_url: "https://a.example/".into(),
        redirect_count: 0,
        decision_id: "d-1".into(),
    })
}

struct Pair {
    open: mpsc::UnboundedSender<OpenCommand>,
    accepted: mpsc::UnboundedReceiver<Handles>,
    _guest: tokio::task::JoinHandle<Ended>,
}

/// A guest and a host driver joined by a duplex pipe of `pipe` bytes.
fn pair(pipe: usize, guest_options: io::Options) -> Pair {
    let (guest_io, host_io) = tokio::io::duplex(pipe);
    pair_over(guest_io, host_io, guest_options)
}

fn pair_over<T>(guest_io: T, host_io: T, guest_options: io::Options) -> Pair
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (open, mut opens) = mpsc::unbounded_channel();
    let (accept, accepted) = mpsc::unbounded_channel();
    let guest = tokio::spawn(async move {
        io::drive(
            guest_io,
            support::client(),
            &mut Opener::default(),
            Some(&mut opens),
            &guest_options,
        )
        .await
    });
    tokio::spawn(async move {
        io::drive(
            host_io,
            support::server(),
            &mut Acceptor(accept),
            None::<&mut mpsc::UnboundedReceiver<()>>,
            &io::Options::default(),
        )
        .await
    });
    Pair {
        open,
        accepted,
        _guest: guest,
    }
}

async fn open(pair: &mut Pair) -> (Handles, Handles) {
    let (reply, answer) = oneshot::channel();
    let call = MethodCall::HttpRequest(HttpRequest::new("POST", "https://a.example/"));
    pair.open.send((call, reply)).expect("guest driver runs");
    let guest = answer.await.expect("opened");
    let host = pair.accepted.recv().await.expect("accepted");
    (guest, host)
}

async fn read_all(input: &mut StreamIn) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        match input.next().await {
            Inbound::Data(data) => body.extend_from_slice(&data),
            Inbound::End(_) => return body,
            Inbound::Head(_) => {}
            Inbound::Failed { error, .. } => panic!("stream failed: {error:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn streams_carry_bodies_both_ways_through_the_driver() {
    let mut pair = pair(64 * 1024, io::Options::default());
    let ((mut guest_in, guest_out), (mut host_in, host_out)) = open(&mut pair).await;
    // Nobody can open anything more; the stream already handed out keeps the connection.
    let (closed, _) = mpsc::unbounded_channel();
    drop(std::mem::replace(&mut pair.open, closed));
    let upload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let sent = upload.clone();
    let uploader = tokio::spawn(async move {
        guest_out.data(Bytes::from(sent)).await.expect("upload");
        guest_out.end().expect("end");
    });
    let echo = tokio::spawn(async move {
        let body = read_all(&mut host_in).await;
        host_out.head(head()).expect("head");
        host_out.data(Bytes::from(body)).await.expect("echo");
        host_out.end().expect("end");
    });
    assert!(matches!(guest_in.next().await, Inbound::Head(_)));
    assert_eq!(read_all(&mut guest_in).await, upload);
    uploader.await.expect("uploader");
    echo.await.expect("echo");
}

/// A transport that takes a few bytes at a time: the writer's vectored writes stop mid-header and
/// mid-payload again and again, and every byte still arrives once and in order, on several streams at once.
/// On the real clock and two workers: a writer that loses its place sends garbage the drivers keep
/// resynchronising on, busily enough that a paused clock (or a single thread) never reaches the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_survive_a_transport_that_takes_a_few_bytes_per_write() {
    echo_three_streams(pair(7, io::Options::default())).await;
}

/// The same over a transport without vectored writes (as vsock is here): the writer copies each burst
/// together instead of sending a header and its payload with a syscall each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_survive_a_transport_without_vectored_writes() {
    let (guest_io, host_io) = tokio::io::duplex(7);
    echo_three_streams(pair_over(
        NotVectored(guest_io),
        NotVectored(host_io),
        io::Options::default(),
    ))
    .await;
}

/// A transport that writes one buffer at a time (the default `poll_write_vectored`).
struct NotVectored(tokio::io::DuplexStream);

impl tokio::io::AsyncRead for NotVectored {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for NotVectored {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Three streams at once, each echoing 150 kB of its own pattern; within a minute of the real clock.
async fn echo_three_streams(mut pair: Pair) {
    let transfers = async {
        let mut echoes = Vec::new();
        for n in 0..3u32 {
            let ((mut guest_in, guest_out), (mut host_in, host_out)) = open(&mut pair).await;
            let upload: Vec<u8> = (0..150_000u32).map(|i| ((i + n) % 253) as u8).collect();
            let sent = upload.clone();
            tokio::spawn(async move {
                guest_out.data(Bytes::from(sent)).await.expect("upload");
                guest_out.end().expect("end");
            });
            tokio::spawn(async move {
                let body = read_all(&mut host_in).await;
                host_out.head(head()).expect("head");
                host_out.data(Bytes::from(body)).await.expect("echo");
                host_out.end().expect("end");
            });
            echoes.push(tokio::spawn(async move {
                assert!(matches!(guest_in.next().await, Inbound::Head(_)));
                assert_eq!(read_all(&mut guest_in).await, upload);
            }));
        }
        for echo in echoes {
            echo.await.expect("echo arrived whole");
        }
    };
    tokio::time::timeout(Duration::from_secs(60), transfers)
        .await
        .expect("every stream opens and its echo arrives; nothing stalls");
}

/// A peer that reads nothing lets a sender get no further than its credit plus the stream's send buffer,
/// and what was attached to the bytes is let go only as they are written.
#[tokio::test(start_paused = true)]
async fn a_reader_that_takes_nothing_stalls_only_its_sender_within_the_bounds() {
    let mut pair = pair(16 * 1024, io::Options::default());
    let ((mut guest_in, _guest_out), (_host_in, host_out)) = open(&mut pair).await;
    host_out.head(head()).expect("head");
    let live = Arc::new(AtomicUsize::new(0));
    let handed = Arc::new(AtomicUsize::new(0));
    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let sender = {
        let (live, handed, out) = (live.clone(), handed.clone(), host_out.clone());
        tokio::spawn(async move {
            for _ in 0..1_000 {
                let reserved = out.reserve(Bytes::from(vec![9u8; 4096])).await?;
                live.fetch_add(1, Ordering::SeqCst);
                handed.fetch_add(4096, Ordering::SeqCst);
                reserved.send(Some(Box::new(Counted(live.clone()))))?;
            }
            Ok::<_, io::SendError>(())
        })
    };
    // Paused time moves on only when every task waits: the sender is stuck, not slow.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(
        !sender.is_finished(),
        "4 MB went out to a reader that takes nothing"
    );
    let handed_now = handed.load(Ordering::SeqCst);
    let bound = DEFAULT_STREAM_WINDOW as usize + STREAM_SEND_BUFFER + 4096;
    assert!(
        handed_now <= bound,
        "{handed_now} bytes handed over, more than credit + send buffer ({bound})"
    );
    assert!(
        live.load(Ordering::SeqCst) * 4096 <= STREAM_SEND_BUFFER + 16 * 1024 + 4096,
        "holds of written bytes were kept"
    );
    assert!(host_out.delivered() <= DEFAULT_STREAM_WINDOW as u64);
    // Once the reader takes its data, everything goes through and every hold is let go.
    let reader = tokio::spawn(async move {
        let mut total = 0;
        while total < 4_096_000 {
            match guest_in.next().await {
                Inbound::Data(data) => total += data.len(),
                Inbound::Head(_) => {}
                other => panic!("{other:?}"),
            }
        }
        total
    });
    sender.await.expect("sender task").expect("all sent");
    assert_eq!(reader.await.expect("reader"), 4_096_000);
    assert_eq!(live.load(Ordering::SeqCst), 0, "every hold dropped");
    assert_eq!(host_out.delivered(), 4_096_000);
}

/// A peer that stops answering is found by the keepalive: two silent periods end the connection.
#[tokio::test(start_paused = true)]
async fn keepalive_finds_a_peer_that_went_silent() {
    let (guest_io, host_io) = tokio::io::duplex(4096);
    // The "host" answers the handshake, then takes the guest's bytes and never answers again.
    let silent = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut host_io = host_io;
        let mut session = support::server();
        let mut buf = vec![0u8; 4096];
        while !session.is_established() {
            let n = host_io.read(&mut buf).await.expect("read");
            session.receive(&buf[..n]);
            while let Some(frame) = session.poll_transmit() {
                host_io.write_all(&frame.encode()).await.expect("write");
            }
        }
        while host_io.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    });
    let options = io::Options {
        keepalive: Some(Duration::from_secs(15)),
        ..io::Options::default()
    };
    let ended = io::drive(
        guest_io,
        Session::client(pexi_protocol::session::Config::new("g", "1")),
        &mut Opener::default(),
        None,
        &options,
    )
    .await;
    assert_eq!(ended, Ended::Lost);
    silent.abort();
}

/// A handler that asks for a new session from its after-step (as the SDK does when the host says it lost
/// the session) gets it at once: the new HELLO goes out without waiting for more input.
#[tokio::test(start_paused = true)]
async fn a_restart_asked_for_after_a_step_sends_the_new_hello_at_once() {
    use pexi_protocol::frame::{Frame, FrameDecoder, FrameType};
    use pexi_protocol::payload::{cbor, ErrorCode, ErrorPayload};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Restarter(bool);
    impl Handler for Restarter {
        type Command = ();
        fn event(&mut self, _link: &mut Link, event: Event) {
            if let Event::PeerError(error) = event {
                self.0 = error.code == ErrorCode::SessionReset;
            }
        }
        fn after(&mut self, link: &mut Link) {
            if std::mem::take(&mut self.0) {
                link.restart(support::client(), "the PEP lost the session");
            }
        }
    }

    let (guest_io, mut host_io) = tokio::io::duplex(64 * 1024);
    let guest = tokio::spawn(async move {
        io::drive(
            guest_io,
            support::client(),
            &mut Restarter(false),
            None,
            &io::Options::default(),
        )
        .await
    });
    let mut host = support::server();
    let mut buf = vec![0u8; 4096];
    while !host.is_established() {
        let n = host_io.read(&mut buf).await.expect("read");
        host.receive(&buf[..n]);
        while let Some(frame) = host.poll_transmit() {
            host_io.write_all(&frame.encode()).await.expect("write");
        }
    }
    // The host lost the session: ERROR session_reset on stream 0, and nothing more from it.
    let lost = ErrorPayload::new(ErrorCode::SessionReset, "no session: send HELLO");
    let frame = Frame::new(FrameType::Error, 0, cbor::encode(&lost));
    host_io.write_all(&frame.encode()).await.expect("write");
    let mut decoder = FrameDecoder::new(65_536);
    let hello = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = host_io.read(&mut buf).await.expect("read");
            assert!(n > 0, "the guest closed instead of starting over");
            let mut input = &buf[..n];
            while let Some(frame) = decoder.decode(&mut input) {
                if frame.expect("frame").frame_type == FrameType::Hello {
                    return;
                }
            }
        }
    })
    .await;
    assert!(hello.is_ok(), "no new HELLO: the restart waited for input");
    guest.abort();
}
