//! Frame type codes and header flags.

/// The frame type byte. Codes `0x01..=0x0f` are session frames (stream id 0, except ERROR which may be on
/// either), `0x10..=0x1f` stream frames. Anything else is [`FrameType::Unknown`]: the session skips it if the
/// frame carries [`Flags::IGNORABLE`] and treats it as a protocol error otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameType {
    Hello,
    HelloAck,
    Ping,
    Pong,
    WindowUpdate,
    GoAway,
    Sync,
    SyncAck,
    Open,
    Data,
    Head,
    End,
    Error,
    Cancel,
    Unknown(u8),
}

impl FrameType {
    /// Every known type, in code order.
    pub const ALL: [FrameType; 14] = [
        FrameType::Hello,
        FrameType::HelloAck,
        FrameType::Ping,
        FrameType::Pong,
        FrameType::WindowUpdate,
        FrameType::GoAway,
        FrameType::Sync,
        FrameType::SyncAck,
        FrameType::Open,
        FrameType::Data,
        FrameType::Head,
        FrameType::End,
        FrameType::Error,
        FrameType::Cancel,
    ];

    pub fn code(self) -> u8 {
        match self {
            FrameType::Hello => 0x01,
            FrameType::HelloAck => 0x02,
            FrameType::Ping => 0x03,
            FrameType::Pong => 0x04,
            FrameType::WindowUpdate => 0x05,
            FrameType::GoAway => 0x06,
            FrameType::Sync => 0x07,
            FrameType::SyncAck => 0x08,
            FrameType::Open => 0x10,
            FrameType::Data => 0x11,
            FrameType::Head => 0x12,
            FrameType::End => 0x13,
            FrameType::Error => 0x14,
            FrameType::Cancel => 0x15,
            FrameType::Unknown(code) => code,
        }
    }

    pub fn from_code(code: u8) -> FrameType {
        FrameType::ALL
            .into_iter()
            .find(|t| t.code() == code)
            .unwrap_or(FrameType::Unknown(code))
    }

    /// The name used in the spec, the vectors and logs.
    pub fn name(self) -> &'static str {
        match self {
            FrameType::Hello => "HELLO",
            FrameType::HelloAck => "HELLO_ACK",
            FrameType::Ping => "PING",
            FrameType::Pong => "PONG",
            FrameType::WindowUpdate => "WINDOW_UPDATE",
            FrameType::GoAway => "GOAWAY",
            FrameType::Sync => "SYNC",
            FrameType::SyncAck => "SYNC_ACK",
            FrameType::Open => "OPEN",
            FrameType::Data => "DATA",
            FrameType::Head => "HEAD",
            FrameType::End => "END",
            FrameType::Error => "ERROR",
            FrameType::Cancel => "CANCEL",
            FrameType::Unknown(_) => "UNKNOWN",
        }
    }

    /// Frames that must travel on stream 0.
    pub fn is_session_frame(self) -> bool {
        matches!(
            self,
            FrameType::Hello
                | FrameType::HelloAck
                | FrameType::Ping
                | FrameType::Pong
                | FrameType::GoAway
                | FrameType::Sync
                | FrameType::SyncAck
        )
    }
}

/// The 16-bit flags field. Bits without a meaning here are reserved: senders set them to 0 and receivers
/// ignore them, so that a later minor revision can give them one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(pub u16);

impl Flags {
    /// A receiver that does not know this frame's type skips it instead of failing the session.
    pub const IGNORABLE: Flags = Flags(0x0001);

    pub const fn empty() -> Flags {
        Flags(0)
    }

    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}
