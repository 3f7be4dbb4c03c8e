//! Objects xlb could not program, and why. One bad object never stops the
//! others: it is skipped, logged once, and counted by reason.

use std::fmt;

/// Why an object (or a part of it) was skipped.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, thiserror::Error)]
pub enum Invalid {
    #[error("does not parse: {0}")]
    Parse(String),
    #[error("invalid IP address {0:?}")]
    Ip(String),
    #[error("port {0} is out of range 1-65535")]
    Port(i32),
    #[error("unknown protocol {0:?}")]
    Protocol(String),
    #[error("{0} is not supported yet")]
    Unsupported(String),
    #[error("does not fit in the datapath: {0}")]
    Capacity(String),
    #[error("conflicts with another object: {0}")]
    Conflict(String),
    #[error("nothing left to allocate: {0}")]
    RangeFull(String),
}

impl Invalid {
    /// The `reason` label of the invalid-objects metric.
    pub fn label(&self) -> &'static str {
        match self {
            Invalid::Parse(_) => "parse",
            Invalid::Ip(_) => "invalid_ip",
            Invalid::Port(_) => "invalid_port",
            Invalid::Protocol(_) => "unknown_protocol",
            Invalid::Unsupported(_) => "unsupported",
            Invalid::Capacity(_) => "capacity",
            Invalid::Conflict(_) => "conflict",
            Invalid::RangeFull(_) => "range_full",
        }
    }

    /// The `reason` of the Kubernetes Event on the object.
    pub fn event_reason(&self) -> &'static str {
        match self {
            Invalid::Parse(_) => "ParseError",
            Invalid::Ip(_) => "InvalidIP",
            Invalid::Port(_) => "InvalidPort",
            Invalid::Protocol(_) => "UnknownProtocol",
            Invalid::Unsupported(_) => "Unsupported",
            Invalid::Capacity(_) => "OverCapacity",
            Invalid::Conflict(_) => "Conflict",
            Invalid::RangeFull(_) => "RangeFull",
        }
    }
}

/// One skipped object (or part of one).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Problem {
    /// What was skipped, e.g. `Service default/web` or `manifests.yaml document 3`.
    pub object: String,
    pub reason: Invalid,
}

impl Problem {
    pub fn new(object: impl Into<String>, reason: Invalid) -> Self {
        Self {
            object: object.into(),
            reason,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}
