// lstm-serve-front: the native front of lstm-serve (docs/NATIVE_FRONT.md).
//
//   lstm-serve-front --listen 0.0.0.0:8001 --dir /run/lstm-serve [--tls-cert F --tls-key F]
//
// Serves LstmServe/Stream and StreamMulti natively (batched into ticks for the Python server on
// DIR/ticks.sock) and passes every other method through to DIR/grpc.sock (lstm-serve
// --native-front-dir DIR).
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <grpcpp/server_builder.h>
#include <signal.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "front.h"

namespace front {

grpc::ServerGenericBidiReactor* FrontService::CreateReactor(
    grpc::GenericCallbackServerContext* ctx) {
  const bool multi = ctx->method() == kStreamMultiMethod;
  if (multi || ctx->method() == kStreamMethod) {
    auto stream = std::make_shared<NativeStream>(ctx, ticker_, ticker_->NextId(), multi);
    auto drain = ticker_->Register(stream);
    stream->Begin(stream);
    if (drain) stream->Drain(*drain);  // opened while the server drains
    return stream.get();
  }
  return StartProxy(ctx, upstream_.get());
}

}  // namespace front

namespace {

struct Options {
  std::string listen = "0.0.0.0:8001";
  std::string dir;
  std::string tls_cert, tls_key, tls_client_ca;
  size_t max_tick_bytes = 64 << 20;
  int max_ticks_in_flight = 1;  // measured best at S = 1..256 (docs/NATIVE_FRONT.md)
  long parent_pid = 0;  // --parent-pid: exit (as on SIGTERM) when that process dies
  int tls_reload_s = 10;  // --tls-reload-s: how often the TLS files are read again
};

int Usage(const char* why) {
  std::fprintf(stderr,
               "lstm-serve-front: %s\nusage: lstm-serve-front --dir DIR [--listen HOST:PORT] "
               "[--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]] [--max-tick-bytes N] "
               "[--max-ticks-in-flight N] [--parent-pid PID] [--tls-reload-s N]\n",
               why);
  return 2;
}

bool ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::stringstream data;
  data << in.rdbuf();
  *out = data.str();
  return true;
}

std::shared_ptr<grpc::Channel> Local(const std::string& socket) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  // A local socket: a restarted lstm-serve is found within 0.1-1 s, not gRPC's default backoff
  // (1 s growing to 120 s).
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  return grpc::CreateCustomChannel("unix:" + socket, grpc::InsecureChannelCredentials(), args);
}

// lstm-serve --native-front: the parent's death (SIGKILL included) sends this process SIGTERM,
// waited for below like any other. Checked after prctl: a parent that died before it is gone.
bool ExitWithParent(long parent_pid) {
#ifdef __linux__
  if (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0) return false;
#endif
  return static_cast<long>(getppid()) == parent_pid;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (i + 1 >= argc) return Usage(("missing value for " + arg).c_str());
    std::string value = argv[++i];
    if (arg == "--listen") opt.listen = value;
    else if (arg == "--dir") opt.dir = value;
    else if (arg == "--tls-cert") opt.tls_cert = value;
    else if (arg == "--tls-key") opt.tls_key = value;
    else if (arg == "--tls-client-ca") opt.tls_client_ca = value;
    else if (arg == "--max-tick-bytes") opt.max_tick_bytes = std::strtoull(value.c_str(), nullptr, 10);
    else if (arg == "--max-ticks-in-flight") opt.max_ticks_in_flight = std::atoi(value.c_str());
    else if (arg == "--parent-pid") opt.parent_pid = std::atol(value.c_str());
    else if (arg == "--tls-reload-s") opt.tls_reload_s = std::atoi(value.c_str());
    else return Usage(("unknown flag " + arg).c_str());
  }
  if (opt.dir.empty()) return Usage("--dir is required (lstm-serve --native-front-dir)");
  if (opt.tls_cert.empty() != opt.tls_key.empty()) return Usage("--tls-cert needs --tls-key");
  if (!opt.tls_client_ca.empty() && opt.tls_cert.empty()) {
    return Usage("--tls-client-ca needs --tls-cert and --tls-key");
  }
  if (opt.tls_reload_s < 1) return Usage("--tls-reload-s must be >= 1");

  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);  // every thread: waited for below
  if (opt.parent_pid != 0 && !ExitWithParent(opt.parent_pid)) {
    return Usage("--parent-pid: that process is not this one's parent (it ended already?)");
  }

  front::Ticker ticker(opt.dir + "/ticks.sock", opt.max_tick_bytes, opt.max_ticks_in_flight);
  front::FrontService service(&ticker, Local(opt.dir + "/grpc.sock"));

  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  if (!opt.tls_cert.empty()) {
    // Read here for a clear error at start; then gRPC's file watcher reads them again every
    // --tls-reload-s (new connections get what changed; a key that does not match its
    // certificate is not taken), as lstm-serve re-reads its own.
    std::string pem;
    if (!ReadFile(opt.tls_key, &pem) || !ReadFile(opt.tls_cert, &pem)) {
      return Usage("cannot read --tls-cert / --tls-key");
    }
    if (!opt.tls_client_ca.empty() && !ReadFile(opt.tls_client_ca, &pem)) {
      return Usage("cannot read --tls-client-ca");
    }
    auto files = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
        opt.tls_key, opt.tls_cert, opt.tls_client_ca, opt.tls_reload_s);
    grpc::experimental::TlsServerCredentialsOptions tls(files);
    tls.watch_identity_key_cert_pairs();
    tls.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
    if (!opt.tls_client_ca.empty()) {  // mTLS: a client certificate signed by these CAs
      tls.watch_root_certs();
      tls.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    }
    credentials = grpc::experimental::TlsServerCredentials(tls);
  }
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(opt.listen, credentials, &port);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  builder.RegisterCallbackGenericService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    std::fprintf(stderr, "lstm-serve-front: cannot listen on %s\n", opt.listen.c_str());
    return 1;
  }

  ticker.Start();  // a link open at once: a drain notice reaches idle calls too
  std::printf("{\"event\": \"listening\", \"port\": %d, \"dir\": \"%s\"}\n", port, opt.dir.c_str());
  std::fflush(stdout);

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  ticker.Stop();
  std::printf("{\"event\": \"stopped\", \"ticks\": %llu, \"messages\": %llu}\n",
              static_cast<unsigned long long>(ticker.ticks()),
              static_cast<unsigned long long>(ticker.entries()));
  return 0;
}
