//! One guest's bounded share of the host: what the PEP admits (sessions, streams) and the buffer budget
//! that every byte held on a guest's behalf is charged against. Used by the connection layer ([`crate::serve`])
//! and the request pipeline ([`crate::pipeline`]) alike; depends on neither.

pub mod admission;
pub mod budget;
