// The native front: Stream and StreamMulti terminated here and batched into ticks for the
// Python server; every other method passed through to it. See docs/NATIVE_FRONT.md.
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/alarm.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "lstmserve/v1/lstm_serve.pb.h"
#include "lstmserve/v1/native_front.pb.h"

namespace front {

using lstmserve::v1::Tick;
using lstmserve::v1::TickEntry;
using lstmserve::v1::TickOutcome;
using lstmserve::v1::TickReply;

inline constexpr char kStreamMethod[] = "/lstmserve.v1.LstmServe/Stream";
inline constexpr char kStreamMultiMethod[] = "/lstmserve.v1.LstmServe/StreamMulti";
// A passed-through call's verified client certificate CN, for lstm-serve's --principal-from-cert
// (it trusts this key only on its Unix socket; the front drops any a client sends).
inline constexpr char kCertCnKey[] = "lstm-serve-native-cert-cn-bin";  // binary: any bytes

// The CN of the call's verified client certificate (mTLS), or "".
std::string CertCommonName(grpc::GenericCallbackServerContext* ctx);

class Ticker;

// A draining server's word on the calls it does not know (TickReply.drain): they end with
// `status`, a StreamMulti call at once, a Stream call unless its first message comes within
// `first_message`.
struct DrainNotice {
  grpc::Status status;
  std::chrono::milliseconds first_message{0};
};

// One packed chunk reply (TickReply's columns at one entry).
struct Packed {
  uint64_t seq = 0, total_steps = 0;
  uint32_t steps = 0, held_characters = 0, rewound_steps = 0;
  bool duplicate = false;
  const float* probabilities = nullptr;  // as many as the stream's labels, or none
};

// One client's Stream or StreamMulti call (`multi`): reads one message at a time (one read
// ahead of the answers), hands each to the ticker, writes the answers in order, ends as the
// Python server says. Packed chunk replies are Stream's only.
class NativeStream : public grpc::ServerGenericBidiReactor {
 public:
  NativeStream(grpc::GenericCallbackServerContext* ctx, Ticker* ticker, uint64_t id, bool multi);
  void Begin(std::shared_ptr<NativeStream> self);
  uint64_t id() const { return id_; }

  // From the ticker's thread.
  bool Taken();                          // its message went into a tick (false: it ended)
  void ReadAhead();                      // read its next message (never under the ticker's lock)
  void Answer(const TickOutcome& outcome);
  void Push(const TickOutcome& outcome);  // unasked: a draining server's last message
  void AnswerPacked(const Packed& packed);
  size_t Classes();  // its model's labels (from its `opened` reply)
  void Fail(const grpc::Status& status);  // the link to the Python server broke
  bool Known();                           // the Python server holds state for it
  void Drain(const DrainNotice& notice);  // the server drains: ends it if it sent nothing

  // Reactions (gRPC's threads).
  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnDone() override;
  void OnCancel() override {}

 private:
  void OutcomeLocked(const TickOutcome& outcome);
  void EndLinger();
  void FirstMessageDue();
  void EndLocked(const grpc::Status& status);
  void PumpLocked();

  grpc::GenericCallbackServerContext* ctx_;
  Ticker* ticker_;
  const uint64_t id_;
  const bool multi_;  // a StreamMulti call: TickEntry.multi, TickOutcome.multi_reply
  std::recursive_mutex mu_;  // a reaction may run inline in a Start* call
  grpc::ByteBuffer in_;
  std::list<grpc::ByteBuffer> out_;  // a list: nothing allocated while idle, and the one
                                     // being written (front) never moves
  bool writing_ = false;
  bool eof_ = false;       // the client half-closed
  bool ended_ = false;     // the stream's status is decided (status_)
  bool finished_ = false;  // Finish called
  bool done_ = false;      // OnDone ran: no reactor call any more
  bool reading_ = false;
  bool sent_ = false;      // a message went to the Python server
  int unanswered_ = 0;
  grpc::Status status_;
  std::string authorization_;
  bool has_authorization_ = false;
  std::string cert_cn_;
  std::string traceparent_;  // the caller's trace context (sent with the first message)
  std::string tracestate_;
  bool linger_ = false;  // ended after a final snapshot: Finish waits for EOF (2 s at most)
  std::unique_ptr<grpc::Alarm> alarm_;
  grpc::Status drain_status_;  // Drain: what it ends with if no first message comes
  std::unique_ptr<grpc::Alarm> first_alarm_;  // Drain, on a Stream: the first message's time
  std::string session_id_;  // from the `opened` reply: what packed replies are written with
  std::vector<std::string> labels_;
  uint32_t top_k_ = 0;
  std::shared_ptr<NativeStream> self_;
};

class Link;

// Batches every stream's pending message into one Tick for the Python server, written as one
// frame on a Unix socket (DIR/ticks.sock: a 4-byte little-endian length, then the message;
// replies framed the same way). A tick is written by the thread its message arrived on (or the
// thread whose reply freed room for it), replies are read by the link's own thread. Up to
// `max_in_flight` ticks are in flight; a stream has at most one message in flight, so its
// messages are answered in order.
class Ticker {
 public:
  Ticker(std::string socket_path, size_t max_tick_bytes, int max_in_flight);
  ~Ticker();
  void Start();  // keeps a link open from now on (Keep)
  void Stop();
  // A new call; the server's drain notice if it drains (the call is then ended as it says).
  std::optional<DrainNotice> Register(const std::shared_ptr<NativeStream>& stream);
  void Submit(std::shared_ptr<NativeStream> stream, TickEntry entry);
  void Closed(uint64_t id, bool ok);
  uint64_t NextId() { return next_id_.fetch_add(1); }
  uint64_t ticks() const { return ticks_; }
  uint64_t entries() const { return entries_; }

  // From the link's reader thread.
  void Answered(const TickReply& reply);
  void Lost(Link* link);

 private:
  using Streams = std::vector<std::shared_ptr<NativeStream>>;
  void Pump();  // sends the next ticks while there are some and room
  void Keep();  // the keeper thread: a link open even while no message needs one
  void Drained(const TickReply& reply);  // the server's drain notice (TickReply.drain)
  bool Dispatch(const TickReply& reply, const Streams& who);
  bool TakeLocked(Tick* tick, Streams* who);
  void FailAll(const grpc::Status& status, const std::vector<Streams>& in_flight);

  const std::string socket_path_;
  const size_t max_tick_bytes_;
  const size_t max_in_flight_;
  std::mutex mu_;
  std::condition_variable idle_;
  std::deque<std::pair<std::shared_ptr<NativeStream>, TickEntry>> pending_;
  std::vector<std::pair<uint64_t, bool>> closed_;
  std::unordered_map<uint64_t, std::weak_ptr<NativeStream>> live_;
  std::unordered_map<uint64_t, Streams> in_flight_;  // tick id -> its entries' streams
  std::unordered_map<uint64_t, int> busy_;            // stream id -> 1 while a message is in flight
  bool stop_ = false;
  bool writing_ = false;  // a tick is being written on the link
  std::shared_ptr<Link> link_;
  std::optional<DrainNotice> drain_;  // the link's server drains (reset when the link ends)
  std::thread keeper_;
  uint64_t next_tick_ = 1;
  std::atomic<uint64_t> next_id_{1};
  std::atomic<uint64_t> ticks_{0}, entries_{0};
};

// Any other method: forwarded as bytes to the Python server (metadata, deadline and status
// included), one message in flight each way.
grpc::ServerGenericBidiReactor* StartProxy(grpc::GenericCallbackServerContext* ctx,
                                           grpc::GenericStub* upstream);

class FrontService : public grpc::CallbackGenericService {
 public:
  FrontService(Ticker* ticker, std::shared_ptr<grpc::Channel> upstream)
      : ticker_(ticker), upstream_(std::make_unique<grpc::GenericStub>(upstream)) {}
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override;

 private:
  Ticker* ticker_;
  std::unique_ptr<grpc::GenericStub> upstream_;
};

}  // namespace front
