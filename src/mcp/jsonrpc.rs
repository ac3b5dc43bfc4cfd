//! JSON-RPC 2.0 messages read for their facts only: method, id, tool name, outcome.
//!
//! The reader walks the JSON once with hand-written serde visitors and keeps only what the
//! audit log, the metrics and the policy need; argument values and tool results are skipped
//! without being built. It is strict where a lenient reading could let a denied call through:
//! a message must be an object, a duplicated member the policy looks at (`method`, `id`,
//! `params`, `name`, ...) is an error (JavaScript and Python parsers keep the last copy,
//! so the proxy cannot know which one the server would act on), and nesting deeper than
//! serde_json's recursion limit (128) is an error, never a stack overflow.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// At most this many argument names are kept per message (audit opt-in).
pub const MAX_ARG_NAMES: usize = 32;
/// At most this many tool names are read from one `tools/list` result.
pub const MAX_LISTED_TOOLS: usize = 10_000;
/// Longest id, method or tool name shown in a log line; longer ones are cut and marked.
pub const MAX_LOGGED_LEN: usize = 64;

/// A JSON-RPC id, kept whole so that a response can be matched to its request and the
/// proxy's own error answer can echo it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Id {
    /// A number, as serde_json prints it.
    Num(String),
    Str(String),
    Null,
    /// An object, array or boolean: not a valid id.
    Invalid,
}

impl Id {
    /// The id for a log line: numbers as they are, strings quoted, both cut to
    /// `MAX_LOGGED_LEN` characters.
    pub fn for_log(&self) -> String {
        match self {
            Id::Num(n) => bounded(n),
            Id::Str(s) => format!("\"{}\"", bounded(s)),
            Id::Null => "null".into(),
            Id::Invalid => "(invalid)".into(),
        }
    }

    /// The id as JSON, for an error response the proxy writes itself.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Id::Num(n) => serde_json::from_str::<serde_json::Number>(n)
                .map_or(serde_json::Value::Null, serde_json::Value::Number),
            Id::Str(s) => serde_json::Value::String(s.clone()),
            Id::Null | Id::Invalid => serde_json::Value::Null,
        }
    }
}

/// `s` cut to `MAX_LOGGED_LEN` characters, with `...` when it was cut; control characters
/// are replaced so that a value cannot forge a log line.
pub fn bounded(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(MAX_LOGGED_LEN)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().nth(MAX_LOGGED_LEN).is_some() {
        out.push_str("...");
    }
    out
}

/// `params.name` of a message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Name {
    #[default]
    Absent,
    Str(String),
    /// Present but not a string.
    Invalid,
}

/// What the proxy reads from `params`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Params {
    /// `params` was present and an object.
    pub object: bool,
    /// The tool of a `tools/call` (the prompt of a `prompts/get`).
    pub name: Name,
    /// Names of `params.arguments` (only when asked for, at most `MAX_ARG_NAMES`).
    pub arg_names: Option<Vec<String>>,
    /// `params.protocolVersion` of an `initialize` request.
    pub protocol_version: Option<String>,
    /// `params.uri` (the resource of a `resources/read`).
    pub uri: Name,
    /// `params.taskId` (the task of `tasks/get`, `tasks/update`, `tasks/cancel`).
    pub task_id: Name,
    /// What `params._meta` carries for the 2026-07-28 revision.
    pub meta: Meta,
}

/// Members of `params._meta` the proxy reads (MCP 2026-07-28: the revision travels in every
/// request instead of a handshake, and the W3C trace context beside it, SEP-414).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// `params._meta` was present.
    pub present: bool,
    /// `io.modelcontextprotocol/protocolVersion`; `Name::Invalid` when not a string.
    pub protocol_version: Name,
    /// `traceparent`, when a string.
    pub traceparent: Option<String>,
}

/// The `_meta` key that carries a 2026-07-28 request's protocol revision.
pub const META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";

/// What the proxy reads from a `result`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResultFacts {
    /// `result.isError == true`: a tool ran and reported a failure.
    pub is_error: bool,
    /// `result.tools`, when it is an array (a `tools/list` result): the `name` of each entry,
    /// `None` for an entry without a string name.
    pub tools: Option<Vec<Option<String>>>,
    /// `result.protocolVersion` of an `initialize` result.
    pub protocol_version: Option<String>,
}

/// One JSON-RPC message, in either direction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// `None`: no `id` member (a notification, or an invalid response).
    pub id: Option<Id>,
    /// `Some(Err(()))`: `method` present but not a string.
    pub method: Option<Result<String, ()>>,
    pub params: Params,
    pub result: Option<ResultFacts>,
    /// `error` present: its `code` when that is an integer.
    pub error: Option<Option<i64>>,
}

/// The role a message plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request,
    Notification,
    Response,
    Invalid,
}

impl Message {
    pub fn kind(&self) -> Kind {
        match (&self.method, &self.id) {
            (Some(Ok(_)), Some(Id::Invalid)) => Kind::Invalid,
            (Some(Ok(_)), Some(_)) => Kind::Request,
            (Some(Ok(_)), None) => Kind::Notification,
            (Some(Err(())), _) => Kind::Invalid,
            (None, Some(_)) if self.result.is_some() || self.error.is_some() => Kind::Response,
            (None, _) => Kind::Invalid,
        }
    }

    /// The method name, when it is a string.
    pub fn method(&self) -> Option<&str> {
        match &self.method {
            Some(Ok(m)) => Some(m),
            _ => None,
        }
    }

    /// The tool a `tools/call` names.
    pub fn tool(&self) -> Option<&str> {
        match (&self.params.name, self.method()) {
            (Name::Str(n), Some("tools/call")) => Some(n),
            _ => None,
        }
    }
}

/// A body or SSE event: one message, or a batch (a JSON array).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub batch: bool,
    pub messages: Vec<Message>,
}

/// Why a body is not JSON-RPC the proxy can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not JSON: {0}")]
    Json(String),
    #[error("empty body")]
    Empty,
}

/// What to read besides the essentials.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Keep the names of `params.arguments`.
    pub arg_names: bool,
}

/// Reads one JSON-RPC body: a message object, or a batch array of message objects. An
/// array element that is not an object becomes a message of `Kind::Invalid`.
pub fn parse(body: &[u8], opts: Options) -> Result<Parsed, ParseError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let Some(&first) = first else {
        return Err(ParseError::Empty);
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = if first == b'[' {
        let messages = BatchSeed(opts)
            .deserialize(&mut de)
            .map_err(|e| ParseError::Json(e.to_string()))?;
        Parsed {
            batch: true,
            messages,
        }
    } else {
        let message = MessageSeed(opts)
            .deserialize(&mut de)
            .map_err(|e| ParseError::Json(e.to_string()))?;
        Parsed {
            batch: false,
            messages: vec![message],
        }
    };
    de.end().map_err(|e| ParseError::Json(e.to_string()))?;
    Ok(parsed)
}

// ----------------------------------------------------------------------------- visitors

/// Values of types the proxy does not care about decode to the default: each listed group
/// (`bool`, `num`, `str`, `unit`, `seq`) gets visitor methods returning `Default::default()`.
macro_rules! default_for {
    ($($group:ident),*) => { $(default_for!(@ $group);)* };
    (@ bool) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
    };
    (@ num) => {
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
    };
    (@ str) => {
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
    };
    (@ unit) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
    };
    (@ seq) => {
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Default::default())
        }
    };
}

/// A member name, decoded (escapes resolved), compared with the names the proxy reads.
struct Key(KeyName);

#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyName {
    Method,
    Id,
    Params,
    Result,
    Error,
    Name,
    Arguments,
    ProtocolVersion,
    IsError,
    Tools,
    Code,
    Uri,
    Meta,
    MetaProtocolVersion,
    TraceParent,
    TaskId,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key(match v {
                    "method" => KeyName::Method,
                    "id" => KeyName::Id,
                    "params" => KeyName::Params,
                    "result" => KeyName::Result,
                    "error" => KeyName::Error,
                    "name" => KeyName::Name,
                    "arguments" => KeyName::Arguments,
                    "protocolVersion" => KeyName::ProtocolVersion,
                    "isError" => KeyName::IsError,
                    "tools" => KeyName::Tools,
                    "code" => KeyName::Code,
                    "uri" => KeyName::Uri,
                    "_meta" => KeyName::Meta,
                    META_PROTOCOL_VERSION => KeyName::MetaProtocolVersion,
                    "traceparent" => KeyName::TraceParent,
                    "taskId" => KeyName::TaskId,
                    _ => KeyName::Other,
                }))
            }
        }
        d.deserialize_identifier(V)
    }
}

/// Fails on a second copy of a member the proxy reads.
fn once<E: de::Error>(seen: &mut u32, key: KeyName, name: &str) -> Result<(), E> {
    let bit = 1u32 << (key as u32);
    if *seen & bit != 0 {
        return Err(E::custom(format_args!("duplicate member {name:?}")));
    }
    *seen |= bit;
    Ok(())
}

struct BatchSeed(Options);

impl<'de> DeserializeSeed<'de> for BatchSeed {
    type Value = Vec<Message>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<Message>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for BatchSeed {
    type Value = Vec<Message>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of JSON-RPC messages")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Message>, A::Error> {
        let mut out = Vec::new();
        while let Some(m) = seq.next_element_seed(MessageSeed(self.0))? {
            out.push(m);
        }
        Ok(out)
    }
}

/// One message. Anything but an object decodes to an empty (`Kind::Invalid`) message.
struct MessageSeed(Options);

impl<'de> DeserializeSeed<'de> for MessageSeed {
    type Value = Message;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Message, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for MessageSeed {
    type Value = Message;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON-RPC message object")
    }
    default_for!(bool, num, str, unit, seq);
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message, A::Error> {
        let mut m = Message::default();
        let mut seen = 0u32;
        while let Some(Key(key)) = map.next_key::<Key>()? {
            match key {
                KeyName::Method => {
                    once(&mut seen, key, "method")?;
                    m.method = Some(map.next_value::<MaybeString>()?.0.ok_or(()));
                }
                KeyName::Id => {
                    once(&mut seen, key, "id")?;
                    m.id = Some(map.next_value::<IdValue>()?.0);
                }
                KeyName::Params => {
                    once(&mut seen, key, "params")?;
                    m.params = map.next_value_seed(ParamsSeed(self.0))?;
                }
                KeyName::Result => {
                    once(&mut seen, key, "result")?;
                    m.result = Some(map.next_value::<ResultValue>()?.0);
                }
                KeyName::Error => {
                    once(&mut seen, key, "error")?;
                    m.error = Some(map.next_value::<ErrorValue>()?.0);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(m)
    }
}

/// A string, or `None` for any other type.
#[derive(Default)]
struct MaybeString(Option<String>);

impl<'de> Deserialize<'de> for MaybeString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MaybeString, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybeString;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            default_for!(bool, num, unit, seq);
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MaybeString, E> {
                Ok(MaybeString(Some(v.to_owned())))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MaybeString, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(MaybeString(None))
            }
        }
        d.deserialize_any(V)
    }
}

struct IdValue(Id);

impl<'de> Deserialize<'de> for IdValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<IdValue, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = IdValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON-RPC id")
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<IdValue, E> {
                Ok(IdValue(Id::Invalid))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IdValue, E> {
                Ok(IdValue(Id::Num(v.to_string())))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IdValue, E> {
                Ok(IdValue(Id::Num(v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<IdValue, E> {
                Ok(IdValue(
                    serde_json::Number::from_f64(v).map_or(Id::Invalid, |n| Id::Num(n.to_string())),
                ))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IdValue, E> {
                Ok(IdValue(Id::Str(v.to_owned())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<IdValue, E> {
                Ok(IdValue(Id::Null))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<IdValue, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(IdValue(Id::Invalid))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<IdValue, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(IdValue(Id::Invalid))
            }
        }
        d.deserialize_any(V)
    }
}

struct ParamsSeed(Options);

impl<'de> DeserializeSeed<'de> for ParamsSeed {
    type Value = Params;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Params, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ParamsSeed {
    type Value = Params;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON-RPC params")
    }
    default_for!(bool, num, str, unit, seq);
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Params, A::Error> {
        let mut p = Params {
            object: true,
            ..Params::default()
        };
        let mut seen = 0u32;
        while let Some(Key(key)) = map.next_key::<Key>()? {
            match key {
                KeyName::Name => {
                    once(&mut seen, key, "params.name")?;
                    p.name = name_of(map.next_value::<MaybeString>()?.0);
                }
                KeyName::Arguments => {
                    once(&mut seen, key, "params.arguments")?;
                    if self.0.arg_names {
                        p.arg_names = Some(map.next_value::<ArgNames>()?.0);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                KeyName::ProtocolVersion => {
                    once(&mut seen, key, "params.protocolVersion")?;
                    p.protocol_version = map.next_value::<MaybeString>()?.0;
                }
                KeyName::Uri => {
                    once(&mut seen, key, "params.uri")?;
                    p.uri = name_of(map.next_value::<MaybeString>()?.0);
                }
                KeyName::TaskId => {
                    once(&mut seen, key, "params.taskId")?;
                    p.task_id = name_of(map.next_value::<MaybeString>()?.0);
                }
                KeyName::Meta => {
                    once(&mut seen, key, "params._meta")?;
                    p.meta = map.next_value::<MetaValue>()?.0;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(p)
    }
}

fn name_of(s: Option<String>) -> Name {
    match s {
        Some(s) => Name::Str(s),
        None => Name::Invalid,
    }
}

/// `params._meta`: its protocol revision and trace context; anything else is skipped.
#[derive(Default)]
struct MetaValue(Meta);

impl<'de> Deserialize<'de> for MetaValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MetaValue, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MetaValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("request metadata")
            }
            default_for!(bool, num, str, unit, seq);
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MetaValue, A::Error> {
                let mut m = Meta {
                    present: true,
                    ..Meta::default()
                };
                let mut seen = 0u32;
                while let Some(Key(key)) = map.next_key::<Key>()? {
                    match key {
                        KeyName::MetaProtocolVersion => {
                            once(&mut seen, key, META_PROTOCOL_VERSION)?;
                            m.protocol_version = name_of(map.next_value::<MaybeString>()?.0);
                        }
                        KeyName::TraceParent => {
                            once(&mut seen, key, "params._meta.traceparent")?;
                            m.traceparent = map.next_value::<MaybeString>()?.0;
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(MetaValue(m))
            }
        }
        d.deserialize_any(V)
    }
}

/// The member names of an object (values skipped), at most `MAX_ARG_NAMES`.
#[derive(Default)]
struct ArgNames(Vec<String>);

impl<'de> Deserialize<'de> for ArgNames {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ArgNames, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ArgNames;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("tool arguments")
            }
            default_for!(bool, num, str, unit, seq);
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ArgNames, A::Error> {
                let mut names = Vec::new();
                while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    map.next_value::<IgnoredAny>()?;
                    if names.len() < MAX_ARG_NAMES {
                        names.push(bounded(&k));
                    }
                }
                Ok(ArgNames(names))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Default)]
struct ResultValue(ResultFacts);

impl<'de> Deserialize<'de> for ResultValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ResultValue, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ResultValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON-RPC result")
            }
            default_for!(bool, num, str, unit, seq);
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ResultValue, A::Error> {
                let mut r = ResultFacts::default();
                let mut seen = 0u32;
                while let Some(Key(key)) = map.next_key::<Key>()? {
                    match key {
                        KeyName::IsError => {
                            once(&mut seen, key, "result.isError")?;
                            r.is_error = map.next_value::<TrueValue>()?.0;
                        }
                        KeyName::Tools => {
                            once(&mut seen, key, "result.tools")?;
                            r.tools = map.next_value::<ToolList>()?.0;
                        }
                        KeyName::ProtocolVersion => {
                            once(&mut seen, key, "result.protocolVersion")?;
                            r.protocol_version = map.next_value::<MaybeString>()?.0;
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(ResultValue(r))
            }
        }
        d.deserialize_any(V)
    }
}

/// `true` only for the JSON literal `true`.
#[derive(Default)]
struct TrueValue(bool);

impl<'de> Deserialize<'de> for TrueValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<TrueValue, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TrueValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a boolean")
            }
            default_for!(num, str, unit, seq);
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<TrueValue, E> {
                Ok(TrueValue(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TrueValue, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(TrueValue(false))
            }
        }
        d.deserialize_any(V)
    }
}

/// `result.tools`: the names of its entries when it is an array.
#[derive(Default)]
struct ToolList(Option<Vec<Option<String>>>);

impl<'de> Deserialize<'de> for ToolList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ToolList, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ToolList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of tools")
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<ToolList, E> {
                Ok(ToolList(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<ToolList, E> {
                Ok(ToolList(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<ToolList, E> {
                Ok(ToolList(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<ToolList, E> {
                Ok(ToolList(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<ToolList, E> {
                Ok(ToolList(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<ToolList, E> {
                Ok(ToolList(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ToolList, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(ToolList(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ToolList, A::Error> {
                let mut names = Vec::new();
                while let Some(entry) = seq.next_element::<ToolEntry>()? {
                    if names.len() >= MAX_LISTED_TOOLS {
                        return Err(de::Error::custom("too many tools in one tools/list result"));
                    }
                    names.push(entry.0);
                }
                Ok(ToolList(Some(names)))
            }
        }
        d.deserialize_any(V)
    }
}

/// One entry of `result.tools`: its `name` when that is a string.
#[derive(Default)]
struct ToolEntry(Option<String>);

impl<'de> Deserialize<'de> for ToolEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ToolEntry, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ToolEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a tool")
            }
            default_for!(bool, num, str, unit, seq);
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ToolEntry, A::Error> {
                let mut name = None;
                let mut seen = 0u32;
                while let Some(Key(key)) = map.next_key::<Key>()? {
                    if key == KeyName::Name {
                        once(&mut seen, key, "tools[].name")?;
                        name = map.next_value::<MaybeString>()?.0;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(ToolEntry(name))
            }
        }
        d.deserialize_any(V)
    }
}

/// `error`: its integer `code`, if any.
#[derive(Default)]
struct ErrorValue(Option<i64>);

impl<'de> Deserialize<'de> for ErrorValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ErrorValue, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ErrorValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON-RPC error")
            }
            default_for!(bool, num, str, unit, seq);
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ErrorValue, A::Error> {
                let mut code = None;
                let mut seen = 0u32;
                while let Some(Key(key)) = map.next_key::<Key>()? {
                    if key == KeyName::Code {
                        once(&mut seen, key, "error.code")?;
                        code = map.next_value::<IntValue>()?.0;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(ErrorValue(code))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Default)]
struct IntValue(Option<i64>);

impl<'de> Deserialize<'de> for IntValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<IntValue, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = IntValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer")
            }
            default_for!(bool, str, unit, seq);
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<IntValue, E> {
                Ok(IntValue(None))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntValue, E> {
                Ok(IntValue(Some(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntValue, E> {
                Ok(IntValue(i64::try_from(v).ok()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<IntValue, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(IntValue(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> Message {
        let p = parse(s.as_bytes(), Options { arg_names: true }).unwrap();
        assert!(!p.batch);
        p.messages.into_iter().next().unwrap()
    }

    #[test]
    fn reads_a_tools_call() {
        let m = one(
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"message":"secret","n":1},"_meta":{"progressToken":1}}}"#,
        );
        assert_eq!(m.kind(), Kind::Request);
        assert_eq!(m.id, Some(Id::Num("7".into())));
        assert_eq!(m.method(), Some("tools/call"));
        assert_eq!(m.tool(), Some("echo"));
        assert_eq!(
            m.params.arg_names,
            Some(vec!["message".to_string(), "n".to_string()])
        );
    }

    #[test]
    fn kinds() {
        let cases = [
            (
                r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
                Kind::Notification,
            ),
            (
                r#"{"jsonrpc":"2.0","id":"a","method":"ping"}"#,
                Kind::Request,
            ),
            (
                r#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#,
                Kind::Request,
            ),
            (
                r#"{"jsonrpc":"2.0","id":{"x":1},"method":"ping"}"#,
                Kind::Invalid,
            ),
            (r#"{"jsonrpc":"2.0","id":1,"result":{}}"#, Kind::Response),
            (
                r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"x"}}"#,
                Kind::Response,
            ),
            (r#"{"jsonrpc":"2.0","id":1,"method":5}"#, Kind::Invalid),
            (r#"{"jsonrpc":"2.0","id":1}"#, Kind::Invalid),
            (r#"{"jsonrpc":"2.0"}"#, Kind::Invalid),
            (r#"7"#, Kind::Invalid),
            (r#""tools/call""#, Kind::Invalid),
        ];
        for (text, kind) in cases {
            assert_eq!(one(text).kind(), kind, "{text}");
        }
    }

    #[test]
    fn escapes_are_decoded_before_comparison() {
        let m = one(r#"{"id":1,"m\u0065thod":"tools/call","params":{"n\u0061me":"del\u0065te"}}"#);
        assert_eq!(m.tool(), Some("delete"));
    }

    #[test]
    fn duplicate_members_the_policy_reads_are_errors() {
        for text in [
            r#"{"id":1,"method":"tools/call","method":"ping"}"#,
            r#"{"id":1,"method":"tools/call","params":{"name":"a","name":"b"}}"#,
            r#"{"id":1,"id":2,"method":"ping"}"#,
            r#"{"id":1,"method":"x","params":{},"params":{}}"#,
            r#"{"id":1,"result":{"tools":[],"tools":[]}}"#,
            r#"{"id":1,"result":{"tools":[{"name":"a","name":"b"}]}}"#,
        ] {
            assert!(
                parse(text.as_bytes(), Options::default()).is_err(),
                "{text}"
            );
        }
        // Members nobody reads may repeat (the server decides about them).
        assert!(
            parse(
                br#"{"id":1,"method":"x","foo":1,"foo":2}"#,
                Options::default()
            )
            .is_ok()
        );
    }

    #[test]
    fn positional_or_odd_params_name_no_tool() {
        let m = one(r#"{"id":1,"method":"tools/call","params":["delete"]}"#);
        assert_eq!((m.tool(), m.params.object), (None, false));
        let m = one(r#"{"id":1,"method":"tools/call","params":{"name":["delete"]}}"#);
        assert_eq!((m.tool(), &m.params.name), (None, &Name::Invalid));
    }

    #[test]
    fn batches_and_errors() {
        let p = parse(
            br#" [{"id":1,"method":"tools/call","params":{"name":"a"}},{"method":"notifications/x"},5] "#,
            Options::default(),
        )
        .unwrap();
        assert!(p.batch);
        let kinds: Vec<Kind> = p.messages.iter().map(Message::kind).collect();
        assert_eq!(kinds, [Kind::Request, Kind::Notification, Kind::Invalid]);
        for bad in [
            &b""[..],
            b"   ",
            b"{",
            b"{} {}",
            b"[1,",
            b"{\"id\":1}x",
            b"\xef\xbb\xbf{}",
        ] {
            assert!(parse(bad, Options::default()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn response_facts() {
        let m = one(r#"{"jsonrpc":"2.0","id":"x","result":{"content":[],"isError":true}}"#);
        assert!(m.result.unwrap().is_error);
        let m = one(r#"{"jsonrpc":"2.0","id":"x","result":{"isError":"true"}}"#);
        assert!(!m.result.unwrap().is_error);
        let m = one(r#"{"jsonrpc":"2.0","id":2,"error":{"code":-32602,"message":"bad"}}"#);
        assert_eq!(m.error, Some(Some(-32602)));
        let m = one(
            r#"{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"a","inputSchema":{}},{"title":"no name"},{"name":3}],"nextCursor":"c"}}"#,
        );
        assert_eq!(
            m.result.unwrap().tools,
            Some(vec![Some("a".into()), None, None])
        );
    }

    #[test]
    fn deep_nesting_neither_crashes_nor_hides_the_tool() {
        // Values nobody reads are skipped without recursion (serde_json's ignore path), so
        // depth costs nothing; the members the policy reads stay right.
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let body = format!(
            "{{\"id\":1,\"method\":\"tools/call\",\"params\":{{\"arguments\":{{\"a\":{d}}},\"name\":\"echo\",\"x\":{d}}},\"y\":{d}}}",
            d = deep(100_000)
        );
        for opts in [Options { arg_names: true }, Options::default()] {
            let p = parse(body.as_bytes(), opts).unwrap();
            assert_eq!(p.messages[0].tool(), Some("echo"));
        }
        // Depth where the reader itself descends (an id, a batch element) is no different.
        let id = format!("{{\"id\":{},\"method\":\"ping\"}}", deep(100_000));
        assert_eq!(
            parse(id.as_bytes(), Options::default()).unwrap().messages[0].kind(),
            Kind::Invalid
        );
        let batch = deep(100_000);
        let p = parse(batch.as_bytes(), Options::default()).unwrap();
        assert_eq!(p.messages[0].kind(), Kind::Invalid);
        // Unbalanced: an error, not a crash.
        assert!(
            parse(
                format!("{{\"id\":{}", "[".repeat(100_000)).as_bytes(),
                Options::default()
            )
            .is_err()
        );
    }

    #[test]
    fn ids_for_logs_are_bounded_and_clean() {
        let long = "x".repeat(100_000);
        let m = one(&format!(r#"{{"id":"{long}","method":"ping"}}"#));
        let shown = m.id.as_ref().unwrap().for_log();
        assert!(shown.len() < 80, "{shown}");
        assert!(shown.ends_with("...\""));
        let m = one(r#"{"id":"a\nb","method":"ping"}"#);
        assert_eq!(m.id.unwrap().for_log(), "\"a?b\"");
        let m = one(r#"{"id":1.5e3,"method":"ping"}"#);
        assert_eq!(m.id.clone().unwrap().to_json(), serde_json::json!(1500.0));
    }
}
