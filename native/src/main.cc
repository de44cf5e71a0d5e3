// lstm-serve-front: the native front of lstm-serve (docs/NATIVE_FRONT.md).
//
//   lstm-serve-front --listen 0.0.0.0:8001 --dir /run/lstm-serve [--tls-cert F --tls-key F]
//
// Serves LstmServe/Stream natively (batched into ticks for the Python server on DIR/ticks.sock)
// and passes every other method through to DIR/grpc.sock (lstm-serve --native-front-dir DIR).
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <grpcpp/server_builder.h>
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "front.h"

namespace front {

grpc::ServerGenericBidiReactor* FrontService::CreateReactor(
    grpc::GenericCallbackServerContext* ctx) {
  if (ctx->method() == kStreamMethod) {
    auto stream = std::make_shared<NativeStream>(ctx, ticker_, ticker_->NextId());
    ticker_->Register(stream);
    stream->Begin(stream);
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
  int max_ticks_in_flight = 2;
  unsigned int tls_refresh_s = 5;
};

int Usage(const char* why) {
  std::fprintf(stderr,
               "lstm-serve-front: %s\nusage: lstm-serve-front --dir DIR [--listen HOST:PORT] "
               "[--tls-cert FILE --tls-key FILE [--tls-client-ca FILE] [--tls-refresh-s N]] "
               "[--max-tick-bytes N] "
               "[--max-ticks-in-flight N]\n",
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
    else if (arg == "--tls-refresh-s") opt.tls_refresh_s = static_cast<unsigned>(std::atoi(value.c_str()));
    else return Usage(("unknown flag " + arg).c_str());
  }
  if (opt.dir.empty()) return Usage("--dir is required (lstm-serve --native-front-dir)");
  if (opt.tls_cert.empty() != opt.tls_key.empty()) return Usage("--tls-cert needs --tls-key");
  if (!opt.tls_client_ca.empty() && opt.tls_cert.empty()) {
    return Usage("--tls-client-ca needs --tls-cert and --tls-key");
  }
  if (opt.tls_refresh_s < 1) return Usage("--tls-refresh-s must be at least 1");

  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);  // every thread: waited for below

  front::Ticker ticker(opt.dir + "/ticks.sock", opt.max_tick_bytes, opt.max_ticks_in_flight);
  front::FrontService service(&ticker, Local(opt.dir + "/grpc.sock"));

  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  if (!opt.tls_cert.empty()) {
    std::string pem;  // readable now: a clear error at start, not failed handshakes later
    if (!ReadFile(opt.tls_key, &pem) || !ReadFile(opt.tls_cert, &pem)) {
      return Usage("cannot read --tls-cert / --tls-key");
    }
    if (!opt.tls_client_ca.empty() && !ReadFile(opt.tls_client_ca, &pem)) {
      return Usage("cannot read --tls-client-ca");
    }
    // The files are read again every --tls-refresh-s (cert-manager rotation, as the Python
    // front reloads them): new handshakes get the new pair, open connections keep theirs; a
    // pair that does not match is not taken (gRPC logs it and keeps the previous one).
    auto files = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
        opt.tls_key, opt.tls_cert, opt.tls_client_ca, opt.tls_refresh_s);
    grpc::experimental::TlsServerCredentialsOptions tls(files);
    tls.watch_identity_key_cert_pairs();
    if (!opt.tls_client_ca.empty()) {  // mTLS: a client certificate signed by these CAs
      tls.watch_root_certs();
      tls.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    } else {
      tls.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
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
